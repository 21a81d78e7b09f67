//! The kernel vxlan device, programmed as flannel's vxlan backend programs `flannel.1`: the
//! fallback when eBPF cannot be loaded, and the baseline the benchmarks compare against.
use std::{collections::BTreeMap, net::Ipv4Addr};

use super::{Backend, BackendError, Peer, ROUTE_PROTO};
use crate::{
    host::{MacAddr, netdev},
    subnet::{LeaseAttrs, LeaseBackend, VxlanData},
};
use ipnetwork::Ipv4Network;

pub struct KernelVxlan {
    device: String,
    public_ip: Ipv4Addr,
    vni: u32,
    vtep_mac: MacAddr,
    mtu: u32,
    peers: BTreeMap<Ipv4Network, Peer>,
}

impl KernelVxlan {
    pub fn new(
        device: &str,
        underlay: &str,
        public_ip: Ipv4Addr,
        vni: u32,
        port: u16,
        mtu: u32,
    ) -> Result<Self, BackendError> {
        let link = netdev::link_info(underlay)?;
        let mtu = if mtu > 0 { mtu } else { link.mtu.saturating_sub(50) };
        if !netdev::link_exists(device) {
            netdev::ip(&[
                "link",
                "add",
                device,
                "type",
                "vxlan",
                "id",
                &vni.to_string(),
                "local",
                &public_ip.to_string(),
                "dev",
                underlay,
                "dstport",
                &port.to_string(),
                "nolearning",
            ])?;
            tracing::info!(device, vni, port, "created kernel vxlan device");
        }
        netdev::ip(&["link", "set", device, "mtu", &mtu.to_string(), "up"])?;
        let vtep_mac = netdev::link_info(device)?.mac.unwrap_or_default();
        Ok(KernelVxlan {
            device: device.into(),
            public_ip,
            vni,
            vtep_mac,
            mtu,
            peers: BTreeMap::new(),
        })
    }
}

impl Backend for KernelVxlan {
    fn lease_attrs(&self) -> LeaseAttrs {
        LeaseAttrs::new(
            self.public_ip,
            LeaseBackend::Vxlan(VxlanData {
                vni: self.vni,
                vtep_mac: self.vtep_mac,
            }),
        )
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    fn activate(&mut self, subnet: Ipv4Network, _network: Ipv4Network) -> Result<(), BackendError> {
        netdev::ip(&[
            "addr",
            "replace",
            &format!("{}/32", subnet.network()),
            "dev",
            &self.device,
        ])?;
        Ok(())
    }

    fn set_peer(&mut self, peer: &Peer) -> Result<(), BackendError> {
        if self.peers.get(&peer.subnet) == Some(peer) {
            return Ok(());
        }
        // Peer::check gives every vxlan peer a VtepMAC.
        let mac = peer.vtep_mac.unwrap_or_default().to_string();
        let gw = peer.subnet.network().to_string();
        if let Some(old) = self.peers.remove(&peer.subnet) {
            remove_fdb(&self.device, &old);
        }
        netdev::ip(&[
            "neigh", "replace", &gw, "lladdr", &mac, "dev", &self.device, "nud", "permanent",
        ])?;
        netdev::bridge(&[
            "fdb",
            "replace",
            &mac,
            "dev",
            &self.device,
            "dst",
            &peer.public_ip.to_string(),
            "self",
            "permanent",
        ])?;
        netdev::ip(&[
            "route",
            "replace",
            &peer.subnet.to_string(),
            "via",
            &gw,
            "dev",
            &self.device,
            "onlink",
            "proto",
            ROUTE_PROTO,
        ])?;
        self.peers.insert(peer.subnet, *peer);
        Ok(())
    }

    fn remove_peer(&mut self, subnet: Ipv4Network) -> Result<(), BackendError> {
        if let Some(old) = self.peers.remove(&subnet) {
            let _ = netdev::ip(&["route", "del", &subnet.to_string(), "dev", &self.device]);
            let _ = netdev::ip(&["neigh", "del", &subnet.network().to_string(), "dev", &self.device]);
            remove_fdb(&self.device, &old);
        }
        Ok(())
    }

    fn peers(&self) -> Vec<Ipv4Network> {
        self.peers.keys().copied().collect()
    }

    fn describe(&self) -> String {
        format!("kernel-vxlan (device {})", self.device)
    }
}

fn remove_fdb(device: &str, peer: &Peer) {
    if let Some(mac) = peer.vtep_mac {
        let _ = netdev::bridge(&[
            "fdb",
            "del",
            &mac.to_string(),
            "dev",
            device,
            "dst",
            &peer.public_ip.to_string(),
            "self",
        ]);
    }
}
