//! Backends behind one small interface, as flannel's `pkg/backend`: how packets for a peer's
//! subnet get there. The agent leases, watches and reconciles; a backend programs the host.
//!
//! - [`ebpf`]: our eBPF datapath, vxlan or udp wire format (the default).
//! - [`kernel_vxlan`]: the kernel vxlan device as flannel programs it (fallback, baseline).
//! - [`tun_udp`] + [`userspace_udp`]: flannel's udp design, a TUN device and a userspace
//!   forwarder (fallback, baseline).
//! - [`host_gw`]: plain routes via each peer's PublicIP.

pub mod direct_routing;
pub mod ebpf;
pub mod host_gw;
pub mod kernel_vxlan;
pub mod tun_udp;
pub mod userspace_udp;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::{
    host::{Counters, HostError, MacAddr, netdev},
    subnet::{BackendKind, Lease, LeaseAttrs, LeaseBackend, SubnetKey},
};

/// Routing protocol number on the routes backends install, so `--cleanup` can find them
/// (`ip route show proto 73`).
pub const ROUTE_PROTO: &str = "73";

/// A peer's subnet routed unencapsulated via its PublicIP on `underlay` (host-gw, and vxlan's
/// DirectRouting), tagged with [`ROUTE_PROTO`].
fn route_via_peer(peer: &Peer, underlay: &str) -> Result<(), HostError> {
    let (subnet, via) = (peer.subnet.to_string(), peer.public_ip.to_string());
    netdev::ip(&[
        "route", "replace", &subnet, "via", &via, "dev", underlay, "proto", ROUTE_PROTO,
    ])
    .map(drop)
}

/// Remove what [`route_via_peer`] installed; a route already gone is fine.
fn remove_route_via_peer(subnet: Ipv4Network, underlay: &str) {
    let _ = netdev::ip(&["route", "del", &subnet.to_string(), "dev", underlay]);
}

/// A peer's IPv6 subnet routed unencapsulated via its PublicIPv6 on `underlay`, as flannel's
/// host-gw and vxlan `DirectRouting` route it, tagged with [`ROUTE_PROTO`].
fn route_v6_via_peer(v6: &PeerV6, underlay: &str) -> Result<(), HostError> {
    let (subnet, via) = (v6.subnet.to_string(), v6.public_ip.to_string());
    netdev::ip(&[
        "-6", "route", "replace", &subnet, "via", &via, "dev", underlay, "proto", ROUTE_PROTO,
    ])
    .map(drop)
}

/// Remove what [`route_v6_via_peer`] installed; a route already gone is fine.
fn remove_route_v6_via_peer(subnet: Ipv6Network, underlay: &str) {
    let _ = netdev::ip(&["-6", "route", "del", &subnet.to_string(), "dev", underlay]);
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Datapath(#[from] ebpf::DatapathError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("backend used before its subnet was known")]
    NotActive,
    #[error("{0}")]
    Other(String),
}

/// Another host, as every backend programs it: the subnet it owns, where its tunnel ends and,
/// for vxlan, the MAC of its tunnel device; the same again for IPv6 when its lease has an IPv6
/// side. Read from its lease by [`Peer::from_lease`], or given by hand as `--peer
/// CIDR=IP[,MAC]`; both go through [`Peer::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// `0.0.0.0/0` ([`SubnetKey::NO_IPV4`]) for a peer of an IPv6-only network, as its
    /// lease key writes it; [`Peer::ipv4`] tells.
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    /// Present for every vxlan peer with IPv4 ([`Peer::check`] sees to it); None for the others.
    pub vtep_mac: Option<MacAddr>,
    /// The IPv6 side: present when the lease has an IPv6 subnet and a PublicIPv6.
    pub ipv6: Option<PeerV6>,
}

/// A peer's IPv6 side, as flannel carries it: the IPv6 subnet, reached over the IPv6 underlay
/// at `PublicIPv6`; for vxlan, the MAC of its `flannel-v6.<VNI>` device (`BackendV6Data`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerV6 {
    pub subnet: Ipv6Network,
    pub public_ip: Ipv6Addr,
    /// Present for every vxlan peer ([`Peer::check`] sees to it); None for the others.
    pub vtep_mac: Option<MacAddr>,
}

impl Peer {
    /// The peer a lease describes for a backend of `ours`, or why it cannot be one (flannel's
    /// backends likewise ignore leases of another type).
    pub fn from_lease(lease: &Lease, ours: BackendKind) -> Result<Self, String> {
        let vtep_mac = match &lease.attrs.backend {
            LeaseBackend::Invalid { reason, .. } => return Err(reason.clone()),
            LeaseBackend::Vxlan(data) => Some(data.vtep_mac),
            _ => None,
        };
        if lease.attrs.backend.kind() != Some(ours) {
            return Err(format!(
                "its backend is {:?}, ours is {:?}",
                lease.attrs.backend.type_name(),
                ours.name()
            ));
        }
        let ipv6 = match (lease.key.ipv6, lease.attrs.public_ipv6) {
            (Some(subnet), Some(public_ip)) => Some(PeerV6 {
                subnet,
                public_ip,
                vtep_mac: lease.attrs.vxlan_v6()?.map(|v| v.vtep_mac),
            }),
            (Some(_), None) => return Err("lease with an IPv6 subnet but without PublicIPv6".into()),
            (None, _) => None,
        };
        let peer = Peer {
            subnet: lease.subnet(),
            public_ip: lease.attrs.public_ip,
            vtep_mac,
            ipv6,
        };
        peer.check(ours)?;
        Ok(peer)
    }

    /// Who the peer is: its lease's key (IPv4 subnet, IPv6 subnet), unique in every network,
    /// IPv6-only ones included.
    pub fn key(&self) -> SubnetKey {
        SubnetKey::new(self.subnet, self.ipv6.map(|v| v.subnet))
    }

    /// The IPv4 subnet, None for a peer of an IPv6-only network.
    pub fn ipv4(&self) -> Option<Ipv4Network> {
        (self.subnet != SubnetKey::NO_IPV4).then_some(self.subnet)
    }

    /// The one place that decides whether a peer is usable by a backend of `kind`.
    pub fn check(&self, kind: BackendKind) -> Result<(), String> {
        if self.ipv4().is_some() {
            if self.public_ip.is_unspecified() {
                return Err("lease without PublicIP".into());
            }
            if kind == BackendKind::Vxlan && self.vtep_mac.is_none() {
                return Err("vxlan peer without VtepMAC".into());
            }
        } else if self.ipv6.is_none() {
            return Err("IPv6-only lease without PublicIPv6".into());
        }
        if let Some(v6) = &self.ipv6 {
            if v6.public_ip.is_unspecified() {
                return Err("lease without PublicIPv6".into());
            }
            if kind == BackendKind::Vxlan && v6.vtep_mac.is_none() {
                return Err("vxlan peer with IPv6 but without BackendV6Data.VtepMAC".into());
            }
        }
        Ok(())
    }
}

impl FromStr for Peer {
    type Err = String;
    /// `CIDR=IP[,MAC]`, as the `--peer` flag takes it.
    fn from_str(s: &str) -> Result<Self, String> {
        let (subnet, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("invalid peer {s:?}: expected CIDR=IP[,MAC]"))?;
        let subnet: Ipv4Network = subnet
            .parse()
            .map_err(|e| format!("invalid peer {s:?}: subnet {subnet:?}: {e}"))?;
        if subnet.network() != subnet.ip() {
            return Err(format!(
                "invalid peer {s:?}: {subnet} has host bits set (use {}/{})",
                subnet.network(),
                subnet.prefix()
            ));
        }
        let (ip, mac) = match rest.split_once(',') {
            Some((ip, mac)) => (
                ip,
                Some(mac.parse::<MacAddr>().map_err(|e| format!("invalid peer {s:?}: {e}"))?),
            ),
            None => (rest, None),
        };
        let public_ip = ip
            .parse()
            .map_err(|e| format!("invalid peer {s:?}: PublicIP {ip:?}: {e}"))?;
        Ok(Peer {
            subnet,
            public_ip,
            vtep_mac: mac,
            ipv6: None,
        })
    }
}

pub trait Backend: Send {
    /// What our lease publishes: PublicIP, BackendType, BackendData. Peers are leases of the
    /// same backend kind.
    fn lease_attrs(&self) -> LeaseAttrs;
    /// Container MTU, written to the subnet file as FLANNEL_MTU.
    fn mtu(&self) -> u32;
    /// Program this host once its subnet is leased.
    fn activate(&mut self, subnet: Ipv4Network, network: Ipv4Network) -> Result<(), BackendError>;
    /// Program this host's IPv6 side once its IPv6 subnet is leased (after [`Backend::activate`]
    /// when the network has IPv4 too). Backends without IPv6 refuse.
    fn activate_ipv6(&mut self, subnet: Ipv6Network, network: Ipv6Network) -> Result<(), BackendError> {
        let _ = (subnet, network);
        Err(BackendError::Unavailable(format!(
            "{} does not carry IPv6",
            self.describe()
        )))
    }
    /// Take `public_ip` as our PublicIP from now on (the underlay's address changed and ours
    /// came from it): [`Backend::lease_attrs`] publishes it and the next
    /// [`Backend::activate`] programs it (encapsulation source, what "to us" means).
    fn set_public_ip(&mut self, public_ip: Ipv4Addr) -> Result<(), BackendError> {
        let _ = public_ip;
        Err(BackendError::Unavailable(format!(
            "{} cannot change its PublicIP while running",
            self.describe()
        )))
    }
    /// Add or update a peer (one that passed [`Peer::check`]); repeating an unchanged peer is
    /// cheap and does nothing.
    fn set_peer(&mut self, peer: &Peer) -> Result<(), BackendError>;
    /// Remove the peer whose [`Peer::key`] is `key`; an unknown one is fine.
    fn remove_peer(&mut self, key: SubnetKey) -> Result<(), BackendError>;
    /// The keys of the peers as currently programmed.
    fn peers(&self) -> Vec<SubnetKey>;
    /// Periodic upkeep (about once a second), for backends that follow local state.
    fn tick(&mut self) {}
    /// Datapath counters, where the backend has them.
    fn counters(&mut self) -> Option<Counters> {
        None
    }
    /// What the kernel offers our eBPF datapath (`/status` `capabilities`); None for the
    /// kernel's own datapaths.
    fn capabilities(&self) -> Option<serde_json::Value> {
        None
    }
    /// One line for logs and `overlay status`.
    fn describe(&self) -> String;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet::VxlanData;

    #[test]
    fn peer_flag_parses_and_rejects() {
        let p: Peer = "10.244.2.0/24=192.168.1.2,aa:bb:cc:dd:ee:0f".parse().unwrap();
        assert_eq!(p.subnet.to_string(), "10.244.2.0/24");
        assert_eq!(p.public_ip, Ipv4Addr::new(192, 168, 1, 2));
        assert_eq!(p.vtep_mac.unwrap().to_string(), "aa:bb:cc:dd:ee:0f");
        let p: Peer = "10.244.2.0/24=192.168.1.2".parse().unwrap();
        assert_eq!(p.vtep_mac, None);
        for bad in [
            "10.244.2.0/24", "10.244.2.1/24=1.2.3.4", "10.244.2.0/33=1.2.3.4", "10.244.2.0/24=1.2.3",
            "10.244.2.0/24=1.2.3.4,aa:bb", "10.244.2.0/24=1.2.3.4,aa:bb:cc:dd:ee:zz",
        ] {
            let err = bad.parse::<Peer>().unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    fn lease(backend: LeaseBackend, ip: Ipv4Addr) -> Lease {
        Lease {
            key: SubnetKey::parse("10.244.2.0-24").unwrap(),
            attrs: LeaseAttrs::new(ip, backend),
            lease_id: 1,
            expires: None,
            mod_revision: 1,
        }
    }

    #[test]
    fn a_lease_is_a_peer_only_for_its_own_backend_kind() {
        let ip = Ipv4Addr::new(192, 168, 1, 2);
        let mac: MacAddr = "aa:bb:cc:dd:ee:0f".parse().unwrap();
        let vxlan = lease(LeaseBackend::Vxlan(VxlanData { vni: 1, vtep_mac: mac }), ip);
        let peer = Peer::from_lease(&vxlan, BackendKind::Vxlan).unwrap();
        assert_eq!(peer.vtep_mac, Some(mac));
        assert_eq!(peer.public_ip, ip);
        let err = Peer::from_lease(&vxlan, BackendKind::Udp).unwrap_err();
        assert!(err.contains("\"vxlan\"") && err.contains("\"udp\""), "{err}");
        assert!(Peer::from_lease(&lease(LeaseBackend::Udp, ip), BackendKind::Udp).is_ok());
        let err = Peer::from_lease(&lease(LeaseBackend::Udp, Ipv4Addr::UNSPECIFIED), BackendKind::Udp).unwrap_err();
        assert!(err.contains("PublicIP"), "{err}");
        let bad = LeaseBackend::Invalid {
            backend_type: "vxlan".into(),
            data: None,
            reason: "vxlan lease without BackendData".into(),
        };
        assert_eq!(
            Peer::from_lease(&lease(bad, ip), BackendKind::Vxlan).unwrap_err(),
            "vxlan lease without BackendData"
        );
    }

    #[test]
    fn a_lease_with_ipv6_gives_the_peer_its_ipv6_side() {
        let mac = |s: &str| s.parse::<MacAddr>().unwrap();
        let data = |m: &str| VxlanData {
            vni: 1,
            vtep_mac: mac(m),
        };
        let v6ip: Ipv6Addr = "fd01::2".parse().unwrap();
        let mut dual = lease(
            LeaseBackend::Vxlan(data("aa:bb:cc:00:00:02")),
            Ipv4Addr::new(192, 168, 1, 2),
        );
        dual.key = SubnetKey::parse("10.244.2.0-24&fd00:0:0:2::-64").unwrap();
        dual.attrs = dual.attrs.clone().with_ipv6(v6ip, Some(data("aa:bb:cc:66:00:02")));
        let p = Peer::from_lease(&dual, BackendKind::Vxlan).unwrap();
        assert_eq!(p.ipv4(), Some("10.244.2.0/24".parse().unwrap()));
        let v6 = p.ipv6.unwrap();
        assert_eq!((v6.subnet.to_string(), v6.public_ip), ("fd00:0:0:2::/64".into(), v6ip));
        assert_eq!(v6.vtep_mac, Some(mac("aa:bb:cc:66:00:02")));

        // A vxlan lease with an IPv6 side must say the v6 device's MAC.
        let mut no_mac = dual.clone();
        no_mac.attrs.backend_v6_data = None;
        assert!(
            Peer::from_lease(&no_mac, BackendKind::Vxlan)
                .unwrap_err()
                .contains("BackendV6Data")
        );

        // IPv6-only: no IPv4 side, PublicIP 0.0.0.0 is fine, PublicIPv6 is required.
        let mut v6only = lease(LeaseBackend::HostGw, Ipv4Addr::UNSPECIFIED);
        v6only.key = SubnetKey::parse("0.0.0.0-0&fd00:0:0:3::-64").unwrap();
        assert!(
            Peer::from_lease(&v6only, BackendKind::HostGw)
                .unwrap_err()
                .contains("PublicIPv6")
        );
        v6only.attrs = v6only.attrs.clone().with_ipv6(v6ip, None);
        let p = Peer::from_lease(&v6only, BackendKind::HostGw).unwrap();
        assert_eq!(p.ipv4(), None);
        assert_eq!(p.ipv6.unwrap().subnet.to_string(), "fd00:0:0:3::/64");
    }
}
