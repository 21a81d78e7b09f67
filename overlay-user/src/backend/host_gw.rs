//! flannel's host-gw: no tunnel, a route to each peer's subnet via its PublicIP. Peers must
//! share the underlay's layer 2.
use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnetwork::Ipv4Network;

use super::{Backend, BackendError, Peer};
use crate::{
    host::netdev,
    subnet::{LeaseAttrs, LeaseBackend},
};

pub struct HostGw {
    underlay: String,
    public_ip: Ipv4Addr,
    mtu: u32,
    peers: BTreeMap<Ipv4Network, Ipv4Addr>,
}

impl HostGw {
    pub fn new(underlay: &str, public_ip: Ipv4Addr) -> Result<Self, BackendError> {
        let link = netdev::link_info(underlay)?;
        Ok(HostGw {
            underlay: underlay.into(),
            public_ip,
            mtu: link.mtu,
            peers: BTreeMap::new(),
        })
    }
}

impl Backend for HostGw {
    fn lease_attrs(&self) -> LeaseAttrs {
        LeaseAttrs::new(self.public_ip, LeaseBackend::HostGw)
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    fn activate(&mut self, _subnet: Ipv4Network, _network: Ipv4Network) -> Result<(), BackendError> {
        netdev::sysctl_set("net/ipv4/ip_forward", "1")?;
        Ok(())
    }

    fn set_peer(&mut self, peer: &Peer) -> Result<(), BackendError> {
        if self.peers.get(&peer.subnet) == Some(&peer.public_ip) {
            return Ok(());
        }
        super::route_via_peer(peer, &self.underlay)?;
        self.peers.insert(peer.subnet, peer.public_ip);
        Ok(())
    }

    fn remove_peer(&mut self, subnet: Ipv4Network) -> Result<(), BackendError> {
        if self.peers.remove(&subnet).is_some() {
            super::remove_route_via_peer(subnet, &self.underlay);
        }
        Ok(())
    }

    fn peers(&self) -> Vec<Ipv4Network> {
        self.peers.keys().copied().collect()
    }

    fn describe(&self) -> String {
        format!("host-gw (via {})", self.underlay)
    }
}
