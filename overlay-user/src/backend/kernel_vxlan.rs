//! The kernel vxlan devices, programmed as flannel's vxlan backend programs `flannel.1` and,
//! for IPv6, `flannel-v6.1`: the fallback when eBPF cannot be loaded, and the baseline the
//! benchmarks compare against.
//!
//! Per peer, as flannel: the peer's subnet routed via its network address `onlink` on the
//! device, a permanent neighbour entry mapping that address to the peer's VtepMAC, and an FDB
//! entry sending that MAC to the peer's PublicIP. IPv6 the same on the v6 device, with the v6
//! VtepMAC and the PublicIPv6.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnetwork::{Ipv4Network, Ipv6Network};

use super::{Backend, BackendError, Peer, ROUTE_PROTO};
use crate::{
    host::{MacAddr, netdev},
    subnet::{LeaseAttrs, LeaseBackend, SubnetKey, VxlanData},
};

/// An outer IPv6 header is 20 bytes longer than an IPv4 one.
const IPV6_EXTRA_OVERHEAD: u32 = 20;

/// The name flannel gives its IPv6 vxlan device.
pub fn ipv6_device_name(vni: u32) -> String {
    format!("flannel-v6.{vni}")
}

/// One kernel vxlan device and the MAC it answers to (its VtepMAC).
struct Device {
    name: String,
    mtu: u32,
    vtep_mac: MacAddr,
    /// The device's `local`: the source of what it encapsulates.
    local: IpAddr,
}

impl Device {
    /// `mac`: the MAC to give a device created now (the VtepMAC our lease already publishes).
    fn create(
        name: &str,
        underlay: &str,
        local: IpAddr,
        vni: u32,
        port: u16,
        mtu: u32,
        mac: Option<MacAddr>,
    ) -> Result<Self, BackendError> {
        if !netdev::link_exists(name) {
            let (vni, port, local, mac) = (
                vni.to_string(),
                port.to_string(),
                local.to_string(),
                mac.map(|m| m.to_string()),
            );
            let mut args = vec!["link", "add", name];
            if let Some(mac) = &mac {
                args.extend(["address", mac.as_str()]);
            }
            args.extend([
                "type", "vxlan", "id", &vni, "local", &local, "dev", underlay, "dstport", &port, "nolearning",
            ]);
            netdev::ip(&args)?;
            tracing::info!(device = name, vni, port, %local, "created kernel vxlan device");
        }
        // As flannel: no router advertisements taken on the tunnel device.
        let _ = netdev::sysctl_set(&format!("net/ipv6/conf/{name}/accept_ra"), "0");
        netdev::ip(&["link", "set", name, "mtu", &mtu.to_string(), "up"])?;
        let vtep_mac = netdev::link_info(name)?.mac.unwrap_or_default();
        Ok(Device {
            mtu,
            name: name.to_string(),
            vtep_mac,
            local,
        })
    }

    /// Encapsulate from `local` from now on (the kernel changes it in place: the MAC, FDB and
    /// neighbour entries stay).
    fn set_local(&mut self, local: IpAddr) -> Result<(), BackendError> {
        if self.local != local {
            netdev::ip(&["link", "set", &self.name, "type", "vxlan", "local", &local.to_string()])?;
            tracing::info!(device = %self.name, old = %self.local, new = %local, "kernel vxlan device: new local address");
            self.local = local;
        }
        Ok(())
    }

    /// Route `subnet` via its network address `gw` on this device, with the neighbour and FDB
    /// entries that send it to `public_ip` encapsulated.
    fn add_peer(
        &self,
        family: &str,
        subnet: &str,
        gw: &str,
        mac: MacAddr,
        public_ip: &str,
    ) -> Result<(), BackendError> {
        let mac = mac.to_string();
        netdev::ip(&[
            family, "neigh", "replace", gw, "lladdr", &mac, "dev", &self.name, "nud", "permanent",
        ])?;
        netdev::bridge(&[
            "fdb", "replace", &mac, "dev", &self.name, "dst", public_ip, "self", "permanent",
        ])?;
        netdev::ip(&[
            family, "route", "replace", subnet, "via", gw, "dev", &self.name, "onlink", "proto", ROUTE_PROTO,
        ])?;
        Ok(())
    }

    /// Undo [`Device::add_peer`]; entries already gone are fine.
    fn remove_peer(&self, family: &str, subnet: &str, gw: &str, mac: Option<MacAddr>, public_ip: &str) {
        let _ = netdev::ip(&[family, "route", "del", subnet, "dev", &self.name]);
        let _ = netdev::ip(&[family, "neigh", "del", gw, "dev", &self.name]);
        if let Some(mac) = mac {
            let _ = netdev::bridge(&[
                "fdb",
                "del",
                &mac.to_string(),
                "dev",
                &self.name,
                "dst",
                public_ip,
                "self",
            ]);
        }
    }
}

pub struct KernelVxlan {
    /// `flannel.<VNI>`; None in an IPv6-only network.
    v4: Option<Device>,
    /// `flannel-v6.<VNI>`; None without IPv6.
    v6: Option<Device>,
    public_ip: Ipv4Addr,
    public_ipv6: Option<Ipv6Addr>,
    underlay: String,
    vni: u32,
    port: u16,
    mtu: u32,
    peers: BTreeMap<SubnetKey, Peer>,
}

impl KernelVxlan {
    /// `public_ip` None: an IPv6-only network (no `device`); `public_ipv6` Some: the network has
    /// IPv6, carried by `flannel-v6.<VNI>` from that address. `mtu` (0: the underlay's minus
    /// 50, as flannel sets it) is `flannel.<VNI>`'s; `flannel-v6.<VNI>` gets 20 bytes less, for
    /// the larger outer header: the kernel refuses a vxlan-over-IPv6 device an MTU above its
    /// lower device's minus 70 (flannel asks for the same MTU on both devices).
    /// [`Backend::mtu`] (`FLANNEL_MTU`) is the IPv4 device's, as flannel reports it, or the IPv6
    /// device's in an IPv6-only network.
    pub fn new(
        device: &str,
        underlay: &str,
        public_ip: Option<Ipv4Addr>,
        public_ipv6: Option<Ipv6Addr>,
        vni: u32,
        port: u16,
        mtu: u32,
    ) -> Result<Self, BackendError> {
        let link = netdev::link_info(underlay)?;
        let mtu = if mtu > 0 { mtu } else { link.mtu.saturating_sub(50) };
        let mtu_v6 = mtu.saturating_sub(IPV6_EXTRA_OVERHEAD);
        let v4 = match public_ip {
            Some(ip) => Some(Device::create(device, underlay, ip.into(), vni, port, mtu, None)?),
            None => None,
        };
        let v6 = match public_ipv6 {
            Some(ip) => Some(Device::create(
                &ipv6_device_name(vni),
                underlay,
                ip.into(),
                vni,
                port,
                mtu_v6,
                None,
            )?),
            None => None,
        };
        let mtu = if v4.is_some() { mtu } else { mtu_v6 };
        Ok(KernelVxlan {
            v4,
            v6,
            public_ip: public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            public_ipv6,
            underlay: underlay.to_string(),
            vni,
            port,
            mtu,
            peers: BTreeMap::new(),
        })
    }

    /// The kernel deletes a vxlan device with its `dev` (the underlay re-created): make it
    /// again as it was, same MAC (our lease's VtepMAC), with every peer's entries.
    fn recreate_lost_devices(&mut self) -> Result<(), BackendError> {
        let mut recreated = false;
        let locals = [
            IpAddr::from(self.public_ip),
            self.public_ipv6.map_or(IpAddr::from(self.public_ip), IpAddr::from),
        ];
        for (dev, local) in [&mut self.v4, &mut self.v6].into_iter().zip(locals) {
            let Some(old) = dev.as_ref().filter(|d| !netdev::link_exists(&d.name)) else {
                continue;
            };
            tracing::warn!(device = %old.name, underlay = %self.underlay, "kernel vxlan device gone with the underlay: creating it again");
            *dev = Some(Device::create(
                &old.name,
                &self.underlay,
                local,
                self.vni,
                self.port,
                old.mtu,
                Some(old.vtep_mac),
            )?);
            recreated = true;
        }
        if recreated {
            for peer in self.peers.values() {
                self.install(peer)?;
            }
        }
        Ok(())
    }

    /// The route, neighbour and FDB entries for `peer` on each device, replacing what is there.
    fn install(&self, peer: &Peer) -> Result<(), BackendError> {
        // Peer::check gives every vxlan peer its VtepMACs.
        if let (Some(dev), Some(v4)) = (&self.v4, peer.ipv4()) {
            dev.add_peer(
                "-4",
                &v4.to_string(),
                &v4.network().to_string(),
                peer.vtep_mac.unwrap_or_default(),
                &peer.public_ip.to_string(),
            )?;
        }
        if let (Some(dev), Some(v6)) = (&self.v6, peer.ipv6) {
            dev.add_peer(
                "-6",
                &v6.subnet.to_string(),
                &v6.subnet.network().to_string(),
                v6.vtep_mac.unwrap_or_default(),
                &v6.public_ip.to_string(),
            )?;
        }
        Ok(())
    }

    fn remove_programmed(&self, old: &Peer) {
        if let (Some(dev), Some(v4)) = (&self.v4, old.ipv4()) {
            dev.remove_peer(
                "-4",
                &v4.to_string(),
                &v4.network().to_string(),
                old.vtep_mac,
                &old.public_ip.to_string(),
            );
        }
        if let (Some(dev), Some(v6)) = (&self.v6, old.ipv6) {
            dev.remove_peer(
                "-6",
                &v6.subnet.to_string(),
                &v6.subnet.network().to_string(),
                v6.vtep_mac,
                &v6.public_ip.to_string(),
            );
        }
    }
}

impl Backend for KernelVxlan {
    fn lease_attrs(&self) -> LeaseAttrs {
        // IPv6-only: no IPv4 device, no BackendData, as flannel writes it.
        let backend = match &self.v4 {
            Some(dev) => LeaseBackend::Vxlan(VxlanData {
                vni: self.vni,
                vtep_mac: dev.vtep_mac,
            }),
            None => LeaseBackend::VxlanNoIpv4,
        };
        let attrs = LeaseAttrs::new(self.public_ip, backend);
        match (self.public_ipv6, &self.v6) {
            (Some(ip), Some(dev)) => attrs.with_ipv6(
                ip,
                Some(VxlanData {
                    vni: self.vni,
                    vtep_mac: dev.vtep_mac,
                }),
            ),
            _ => attrs,
        }
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    fn set_public_ip(&mut self, public_ip: Ipv4Addr) -> Result<(), BackendError> {
        self.public_ip = public_ip;
        Ok(())
    }

    fn activate(&mut self, subnet: Ipv4Network, _network: Ipv4Network) -> Result<(), BackendError> {
        self.recreate_lost_devices()?;
        let dev = self.v4.as_mut().ok_or(BackendError::NotActive)?;
        dev.set_local(self.public_ip.into())?;
        netdev::ip(&["addr", "replace", &format!("{}/32", subnet.network()), "dev", &dev.name])?;
        Ok(())
    }

    fn activate_ipv6(&mut self, subnet: Ipv6Network, _network: Ipv6Network) -> Result<(), BackendError> {
        self.recreate_lost_devices()?;
        let dev = self
            .v6
            .as_ref()
            .ok_or_else(|| BackendError::Unavailable("the kernel vxlan backend was started without IPv6".into()))?;
        // As flannel: the subnet's network address as a /128, so no prefix route is made.
        netdev::ip(&[
            "-6",
            "addr",
            "replace",
            &format!("{}/128", subnet.network()),
            "dev",
            &dev.name,
        ])?;
        Ok(())
    }

    fn set_peer(&mut self, peer: &Peer) -> Result<(), BackendError> {
        let key = peer.key();
        if self.peers.get(&key) == Some(peer) {
            return Ok(());
        }
        if let Some(old) = self.peers.remove(&key) {
            self.remove_programmed(&old);
        }
        self.install(peer)?;
        self.peers.insert(key, *peer);
        Ok(())
    }

    fn remove_peer(&mut self, key: SubnetKey) -> Result<(), BackendError> {
        if let Some(old) = self.peers.remove(&key) {
            self.remove_programmed(&old);
        }
        Ok(())
    }

    fn peers(&self) -> Vec<SubnetKey> {
        self.peers.keys().copied().collect()
    }

    fn describe(&self) -> String {
        let names: Vec<&str> = self.v4.iter().chain(&self.v6).map(|d| d.name.as_str()).collect();
        format!("kernel-vxlan (device {})", names.join(", "))
    }
}
