//! IPv6 on our datapath, as flannel's `flannel-v6.<VNI>` carries it: VXLAN only, IPv6 inner
//! packets between PublicIPv6s. The overlay device gets the v6 subnet's address and a route to
//! the v6 network whose MTU leaves room for the 70 bytes of VXLAN over IPv6 (the stack then
//! answers oversize packets with ICMPv6 "packet too big"); the maps get our config and the
//! peers. Kept beside the IPv4 peer table (peers.rs), same rules.
use std::{collections::HashMap, net::Ipv6Addr, str::FromStr};

use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, lpm_trie::Key};
use ipnetwork::Ipv6Network;
use overlay_common::{
    DatapathConfig6, Format, MAP_CONFIG6, MAP_PEERS6, MAP_PEERS6_BY_IP, Peer6 as Peer6Value, PeerSubnet6,
    wire::VXLAN6_OVERHEAD,
};

use super::{
    Datapath, DatapathSpec, Ipv4Side,
    programs::{DatapathError, Programs, not_found, typed_map},
};
use crate::host::{MacAddr, netdev};

/// A remote host's IPv6 side: its v6 subnet, PublicIPv6 and the VtepMAC of its v6 device
/// (flannel's `BackendV6Data`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer6 {
    pub subnet: Ipv6Network,
    pub public_ip: Ipv6Addr,
    pub vtep_mac: MacAddr,
}

impl FromStr for Peer6 {
    type Err = String;
    /// `CIDR=IPv6,MAC`, as `overlay datapath --peer` takes an IPv6 peer.
    fn from_str(s: &str) -> Result<Self, String> {
        let (subnet, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("invalid IPv6 peer {s:?}: expected CIDR=IPv6,MAC"))?;
        let subnet: Ipv6Network = subnet
            .parse()
            .map_err(|e| format!("invalid IPv6 peer {s:?}: subnet {subnet:?}: {e}"))?;
        if subnet.network() != subnet.ip() {
            return Err(format!(
                "invalid IPv6 peer {s:?}: {subnet} has host bits set (use {}/{})",
                subnet.network(),
                subnet.prefix()
            ));
        }
        let (ip, mac) = rest.split_once(',').ok_or_else(|| {
            format!("invalid IPv6 peer {s:?}: VXLAN over IPv6 needs the peer's VtepMAC (CIDR=IPv6,MAC)")
        })?;
        let public_ip: Ipv6Addr = ip
            .parse()
            .map_err(|e| format!("invalid IPv6 peer {s:?}: PublicIPv6 {ip:?}: {e}"))?;
        let vtep_mac = mac
            .parse::<MacAddr>()
            .map_err(|e| format!("invalid IPv6 peer {s:?}: {e}"))?;
        Ok(Peer6 {
            subnet,
            public_ip,
            vtep_mac,
        })
    }
}

/// Our IPv6 side, once [`Datapath::enable_ipv6`] has set it up.
#[derive(Debug)]
pub struct Ipv6Side {
    pub public_ip: Ipv6Addr,
    pub subnet: Ipv6Network,
    pub network: Ipv6Network,
    /// What the v6 peer maps hold.
    peers: HashMap<Ipv6Network, Peer6>,
}

impl Programs {
    pub fn set_config6(&mut self, cfg: &DatapathConfig6) -> Result<(), DatapathError> {
        let mut map: Array<_, DatapathConfig6> = typed_map(&mut self.ebpf, MAP_CONFIG6)?;
        map.set(0, cfg, 0).map_err(|source| DatapathError::Map {
            name: MAP_CONFIG6,
            source,
        })
    }

    /// Insert or replace one IPv6 peer's entries.
    pub fn upsert_peer6(&mut self, peer: &Peer6) -> Result<(), DatapathError> {
        let value = Peer6Value {
            public_ip: peer.public_ip.octets(),
            vtep_mac: peer.vtep_mac.0,
            _pad: [0; 2],
        };
        let by_ip = PeerSubnet6 {
            addr: peer.subnet.network().octets(),
            prefix_len: peer.subnet.prefix(),
            _pad: [0; 3],
        };
        let mut peers: LpmTrie<_, [u8; 16], Peer6Value> = typed_map(&mut self.ebpf, MAP_PEERS6)?;
        peers
            .insert(&key6(peer.subnet), value, 0)
            .map_err(|source| DatapathError::Map {
                name: MAP_PEERS6,
                source,
            })?;
        let mut ips: BpfHashMap<_, [u8; 16], PeerSubnet6> = typed_map(&mut self.ebpf, MAP_PEERS6_BY_IP)?;
        ips.insert(peer.public_ip.octets(), by_ip, 0)
            .map_err(|source| DatapathError::Map {
                name: MAP_PEERS6_BY_IP,
                source,
            })
    }

    /// Remove one IPv6 peer's entries; the PublicIPv6's entry only while it names this subnet
    /// (as for IPv4: a host's old lease may expire after its new one is in).
    pub fn remove_peer6(&mut self, peer: &Peer6) -> Result<(), DatapathError> {
        let mut peers: LpmTrie<_, [u8; 16], Peer6Value> = typed_map(&mut self.ebpf, MAP_PEERS6)?;
        match peers.remove(&key6(peer.subnet)) {
            Err(source) if !not_found(&source) => {
                return Err(DatapathError::Map {
                    name: MAP_PEERS6,
                    source,
                });
            }
            _ => {}
        }
        let mut ips: BpfHashMap<_, [u8; 16], PeerSubnet6> = typed_map(&mut self.ebpf, MAP_PEERS6_BY_IP)?;
        let key = peer.public_ip.octets();
        match ips.get(&key, 0) {
            Ok(s) if s.addr == peer.subnet.network().octets() && s.prefix_len == peer.subnet.prefix() => {}
            Err(source) if !not_found(&source) => {
                return Err(DatapathError::Map {
                    name: MAP_PEERS6_BY_IP,
                    source,
                });
            }
            _ => return Ok(()),
        }
        match ips.remove(&key) {
            Err(source) if !not_found(&source) => Err(DatapathError::Map {
                name: MAP_PEERS6_BY_IP,
                source,
            }),
            _ => Ok(()),
        }
    }
}

impl Programs {
    /// Empty both IPv6 peer maps (a pinned previous run's entries).
    pub fn clear_peers6(&mut self) -> Result<(), DatapathError> {
        let map_err = |name| move |source| DatapathError::Map { name, source };
        let mut peers: LpmTrie<_, [u8; 16], Peer6Value> = typed_map(&mut self.ebpf, MAP_PEERS6)?;
        let keys: Vec<_> = peers.keys().collect::<Result<_, _>>().map_err(map_err(MAP_PEERS6))?;
        for k in keys {
            match peers.remove(&k) {
                Err(source) if !not_found(&source) => return Err(map_err(MAP_PEERS6)(source)),
                _ => {}
            }
        }
        let mut ips: BpfHashMap<_, [u8; 16], PeerSubnet6> = typed_map(&mut self.ebpf, MAP_PEERS6_BY_IP)?;
        let keys: Vec<_> = ips
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(MAP_PEERS6_BY_IP))?;
        for k in keys {
            match ips.remove(&k) {
                Err(source) if !not_found(&source) => return Err(map_err(MAP_PEERS6_BY_IP)(source)),
                _ => {}
            }
        }
        Ok(())
    }
}

impl Programs {
    /// The IPv6 peers in the maps (a pinned previous run's).
    pub fn read_peers6(&mut self) -> Result<HashMap<Ipv6Network, Peer6>, DatapathError> {
        let peers: LpmTrie<_, [u8; 16], Peer6Value> = typed_map(&mut self.ebpf, MAP_PEERS6)?;
        let mut out = HashMap::new();
        for item in peers.iter() {
            let (key, peer) = item.map_err(|source| DatapathError::Map {
                name: MAP_PEERS6,
                source,
            })?;
            let Ok(subnet) = Ipv6Network::new(Ipv6Addr::from(key.data()), key.prefix_len() as u8) else {
                continue;
            };
            out.insert(
                subnet,
                Peer6 {
                    subnet,
                    public_ip: Ipv6Addr::from(peer.public_ip),
                    vtep_mac: MacAddr(peer.vtep_mac),
                },
            );
        }
        Ok(out)
    }
}

fn key6(subnet: Ipv6Network) -> Key<[u8; 16]> {
    Key::new(u32::from(subnet.prefix()), subnet.network().octets())
}

/// The route MTU of the v6 network on the overlay device: the underlay's minus VXLAN over
/// IPv6, as the kernel sizes `flannel-v6.<VNI>`.
pub fn ipv6_route_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(VXLAN6_OVERHEAD)
}

/// The overlay device's MTU, and `FLANNEL_MTU`, in an IPv6-only network: the v6 route's, or
/// the network config's MTU (flannel's, for an IPv4 vxlan device) less the 20 bytes IPv6's
/// outer header adds, as our kernel fallback sizes `flannel-v6.<VNI>`.
pub fn ipv6_only_mtu(configured: Option<u32>, underlay_mtu: u32) -> u32 {
    match configured {
        Some(mtu) => mtu.saturating_sub(VXLAN6_OVERHEAD - Format::Vxlan.overhead()),
        None => ipv6_route_mtu(underlay_mtu),
    }
}

/// What an IPv6-only datapath needs before anything is set up: vxlan (flannel's udp backend
/// has no IPv6) and an overlay MTU that leaves room for VXLAN over IPv6.
pub(super) fn check_ipv6_only(spec: &DatapathSpec, mtu: u32, underlay: &netdev::LinkInfo) -> Result<(), DatapathError> {
    if spec.format != Format::Vxlan {
        return Err(DatapathError::Config(format!(
            "an IPv6-only network needs the vxlan backend: flannel's {} backend has no IPv6",
            super::backend_kind(spec.format).name()
        )));
    }
    if mtu < 1280 || mtu + VXLAN6_OVERHEAD > underlay.mtu {
        return Err(DatapathError::Config(format!(
            "overlay MTU {mtu} does not fit an IPv6-only network: IPv6 needs at least 1280, and underlay {} \
             has MTU {}, of which VXLAN over IPv6 takes {VXLAN6_OVERHEAD} bytes",
            underlay.name, underlay.mtu
        )));
    }
    Ok(())
}

impl Datapath {
    /// The datapath of an IPv6-only network (flannel's `EnableIPv4: false`): the programs as for
    /// dual stack, the IPv4 config empty (IPv4 frames pass decapsulation untouched and are
    /// dropped by encapsulation as unconfigured), the overlay device with only the IPv6
    /// subnet's address and route. Host routing stays off: it is IPv4 only.
    pub fn attach_ipv6_only(
        programs: Programs,
        spec: DatapathSpec,
        public_ip: Ipv6Addr,
        subnet: Ipv6Network,
        network: Ipv6Network,
    ) -> Result<Self, DatapathError> {
        let mut dp = Self::attach_with(programs, spec, None)?;
        dp.enable_ipv6(public_ip, subnet, network)?;
        // The container bridge is found by its address in our IPv6 subnet, known only now.
        dp.sync_bridge();
        Ok(dp)
    }

    /// Our IPv4 side; None in an IPv6-only network.
    pub fn ipv4(&self) -> Option<Ipv4Side> {
        self.ipv4
    }

    /// Carry IPv6 too: our PublicIPv6, v6 subnet and v6 network (flannel's `IPv6Network`).
    /// VXLAN only: flannel's udp backend has no IPv6.
    pub fn enable_ipv6(
        &mut self,
        public_ip: Ipv6Addr,
        subnet: Ipv6Network,
        network: Ipv6Network,
    ) -> Result<(), DatapathError> {
        if self.spec.format != Format::Vxlan {
            return Err(DatapathError::Config(format!(
                "IPv6 needs the vxlan backend: flannel's {:?} backend has no IPv6 (EnableIPv6 / --public-ipv6 with Backend.Type {:?})",
                self.spec.format,
                super::backend_kind(self.spec.format).name()
            )));
        }
        if !network.contains(subnet.network()) || subnet.prefix() < network.prefix() {
            return Err(DatapathError::Config(format!(
                "IPv6 subnet {subnet} is not inside IPv6 network {network}"
            )));
        }
        if public_ip.is_unspecified() || public_ip.is_multicast() {
            return Err(DatapathError::Config(format!(
                "PublicIPv6 {public_ip} is not a unicast address"
            )));
        }
        let mtu = ipv6_route_mtu(self.underlay.mtu);
        if mtu < 1280 {
            return Err(DatapathError::Config(format!(
                "underlay {} has MTU {}: VXLAN over IPv6 needs {VXLAN6_OVERHEAD} bytes, which leaves {mtu}, below IPv6's minimum 1280",
                self.underlay.name, self.underlay.mtu
            )));
        }
        netdev::sysctl_set("net/ipv6/conf/all/forwarding", "1")?;
        let dev = self.overlay.name.clone();
        // IPv6 on the overlay device, without what a link does on its own (link-local
        // address, router solicitations, DAD): only routed traffic goes there.
        netdev::ip(&["link", "set", "dev", &dev, "addrgenmode", "none"])?;
        netdev::sysctl_set(&format!("net/ipv6/conf/{dev}/accept_ra"), "0")?;
        netdev::sysctl_set(&format!("net/ipv6/conf/{dev}/disable_ipv6"), "0")?;
        // As flannel-v6.<VNI>: the subnet's address as a /128, the source of host-originated
        // overlay traffic.
        netdev::ip(&[
            "-6",
            "addr",
            "replace",
            &format!("{}/128", subnet.network()),
            "dev",
            &dev,
            "nodad",
        ])?;
        netdev::ip(&[
            "-6",
            "route",
            "replace",
            &network.to_string(),
            "dev",
            &dev,
            "mtu",
            &mtu.to_string(),
        ])?;
        // With IPv4 beside it, a pinned previous run's IPv6 peers go: the agent sets the current
        // ones right after (a restart's IPv6 gap is that long; the IPv4 peers, which key the
        // reconciliation, are adopted as they are). IPv6-only, they key it, and are adopted.
        let adopted = match self.ipv4 {
            Some(_) => {
                self.programs.clear_peers6()?;
                HashMap::new()
            }
            None => self.programs.read_peers6()?,
        };
        let vtep_mac = self.vtep_mac();
        self.programs.set_config6(&DatapathConfig6 {
            public_ip: public_ip.octets(),
            subnet_addr: subnet.network().octets(),
            subnet_prefix_len: subnet.prefix(),
            enabled: 1,
            port: self.spec.port,
            vni: self.spec.vni,
            vtep_mac: vtep_mac.0,
            _pad: [0; 2],
            underlay_ifindex: self.underlay.ifindex,
            mtu,
        })?;
        tracing::info!(%public_ip, %subnet, %network, route_mtu = mtu, "IPv6 datapath enabled");
        self.ipv6 = Some(Ipv6Side {
            public_ip,
            subnet,
            network,
            peers: adopted,
        });
        Ok(())
    }

    pub fn ipv6(&self) -> Option<&Ipv6Side> {
        self.ipv6.as_ref()
    }

    /// Add or replace an IPv6 peer: inside our v6 network, not ourselves.
    pub fn upsert_peer6(&mut self, peer: Peer6) -> Result<(), DatapathError> {
        let reject = |reason: String| DatapathError::Config(format!("IPv6 peer {}: {reason}", peer.subnet));
        let Some(side) = self.ipv6.as_mut() else {
            return Err(reject("IPv6 is not enabled on this datapath".into()));
        };
        if peer.subnet == side.subnet {
            return Err(reject("is our own IPv6 subnet".into()));
        }
        if !side.network.contains(peer.subnet.network()) {
            return Err(reject(format!("is outside the IPv6 network {}", side.network)));
        }
        if peer.public_ip.is_unspecified() {
            return Err(reject("lease without PublicIPv6".into()));
        }
        if let Some(old) = side.peers.get(&peer.subnet).copied() {
            if old == peer {
                return Ok(());
            }
            self.programs.remove_peer6(&old)?;
            self.ipv6_peers_mut().remove(&peer.subnet);
            self.restore_public_ip6(old.public_ip)?;
        }
        self.programs.upsert_peer6(&peer)?;
        self.ipv6_peers_mut().insert(peer.subnet, peer);
        tracing::debug!(subnet = %peer.subnet, public_ip = %peer.public_ip, vtep_mac = %peer.vtep_mac, "IPv6 peer set");
        Ok(())
    }

    pub fn remove_peer6(&mut self, subnet: Ipv6Network) -> Result<(), DatapathError> {
        let Some(old) = self.ipv6.as_ref().and_then(|s| s.peers.get(&subnet).copied()) else {
            return Ok(());
        };
        self.programs.remove_peer6(&old)?;
        self.ipv6_peers_mut().remove(&subnet);
        self.restore_public_ip6(old.public_ip)
    }

    pub fn peers6(&self) -> impl Iterator<Item = &Peer6> {
        self.ipv6.iter().flat_map(|s| s.peers.values())
    }

    fn ipv6_peers_mut(&mut self) -> &mut HashMap<Ipv6Network, Peer6> {
        &mut self.ipv6.as_mut().expect("IPv6 enabled").peers
    }

    /// Another v6 lease of the same host takes the ingress entry back.
    fn restore_public_ip6(&mut self, ip: Ipv6Addr) -> Result<(), DatapathError> {
        let other = self.peers6().find(|p| p.public_ip == ip).copied();
        match other {
            Some(other) => self.programs.upsert_peer6(&other),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_peer_flag_parses_and_rejects() {
        let p: Peer6 = "fd00:0:0:2::/64=fc00::2,aa:bb:cc:dd:ee:0f".parse().unwrap();
        assert_eq!(p.subnet.to_string(), "fd00:0:0:2::/64");
        assert_eq!(p.public_ip, "fc00::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.vtep_mac.to_string(), "aa:bb:cc:dd:ee:0f");
        for bad in [
            "fd00:0:0:2::/64", "fd00:0:0:2::1/64=fc00::2,aa:bb:cc:dd:ee:0f",
            "fd00:0:0:2::/129=fc00::2,aa:bb:cc:dd:ee:0f", "fd00:0:0:2::/64=fc00::2",
            "fd00:0:0:2::/64=10.0.0.1,aa:bb:cc:dd:ee:0f", "fd00:0:0:2::/64=fc00::2,aa:bb",
        ] {
            let err = bad.parse::<Peer6>().unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn route_mtu_leaves_room_for_vxlan_over_ipv6() {
        assert_eq!(ipv6_route_mtu(1500), 1430);
        assert_eq!(ipv6_route_mtu(9000), 8930);
        // IPv6-only: the same by default; a configured (IPv4 device) MTU less 20.
        assert_eq!(ipv6_only_mtu(None, 1500), 1430);
        assert_eq!(ipv6_only_mtu(Some(1400), 1500), 1380);
    }
}
