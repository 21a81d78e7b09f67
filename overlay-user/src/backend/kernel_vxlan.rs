//! The kernel vxlan device, programmed as flannel's vxlan backend programs `flannel.1`: the
//! fallback when eBPF cannot be loaded, and the baseline the benchmarks compare against.
use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use serde_json::json;

use super::{Backend, BackendError, PeerLease, ROUTE_PROTO};
use crate::{
    datapath::{MacAddr, netdev},
    subnet::LeaseAttrs,
};

pub struct KernelVxlan {
    device: String,
    public_ip: Ipv4Addr,
    vni: u32,
    vtep_mac: MacAddr,
    mtu: u32,
    peers: BTreeMap<Ipv4Network, PeerLease>,
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
            "vxlan",
            Some(json!({"VNI": self.vni, "VtepMAC": self.vtep_mac.to_string()})),
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

    fn set_peer(&mut self, peer: &PeerLease) -> Result<(), BackendError> {
        if self.peers.get(&peer.subnet) == Some(peer) {
            return Ok(());
        }
        let mac = peer
            .vtep_mac
            .ok_or_else(|| BackendError::Peer(peer.subnet, "no VtepMAC".into()))?
            .to_string();
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

    fn expected_backend_type(&self) -> &'static str {
        "vxlan"
    }
}

fn remove_fdb(device: &str, peer: &PeerLease) {
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
