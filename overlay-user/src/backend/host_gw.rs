//! flannel's host-gw: no tunnel, a route to each peer's subnet via its PublicIP, and to its
//! IPv6 subnet via its PublicIPv6. Peers must share the underlay's layer 2.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnetwork::{Ipv4Network, Ipv6Network};

use super::{Backend, BackendError, Peer};
use crate::{
    host::netdev,
    subnet::{LeaseAttrs, LeaseBackend, SubnetKey},
};

pub struct HostGw {
    underlay: String,
    public_ip: Ipv4Addr,
    public_ipv6: Option<Ipv6Addr>,
    mtu: u32,
    peers: BTreeMap<SubnetKey, Peer>,
}

impl HostGw {
    /// `public_ip` is 0.0.0.0 in an IPv6-only network; `public_ipv6` is set when the network
    /// has IPv6.
    pub fn new(underlay: &str, public_ip: Ipv4Addr, public_ipv6: Option<Ipv6Addr>) -> Result<Self, BackendError> {
        let link = netdev::link_info(underlay)?;
        Ok(HostGw {
            underlay: underlay.into(),
            public_ip,
            public_ipv6,
            mtu: link.mtu,
            peers: BTreeMap::new(),
        })
    }

    /// The routes for `peer`, replacing what is there.
    fn install(&self, peer: &Peer) -> Result<(), BackendError> {
        if peer.ipv4().is_some() {
            super::route_via_peer(peer, &self.underlay)?;
        }
        if let (Some(v6), Some(_)) = (peer.ipv6, self.public_ipv6) {
            super::route_v6_via_peer(&v6, &self.underlay)?;
        }
        Ok(())
    }
}

impl Backend for HostGw {
    fn lease_attrs(&self) -> LeaseAttrs {
        let attrs = LeaseAttrs::new(self.public_ip, LeaseBackend::HostGw);
        match self.public_ipv6 {
            Some(v6) => attrs.with_ipv6(v6, None),
            None => attrs,
        }
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    fn activate(&mut self, _subnet: Ipv4Network, _network: Ipv4Network) -> Result<(), BackendError> {
        netdev::sysctl_set("net/ipv4/ip_forward", "1")?;
        // Again after the underlay was re-created or renumbered: the kernel flushed the
        // routes through it.
        for peer in self.peers.values() {
            self.install(peer)?;
        }
        Ok(())
    }

    fn set_public_ip(&mut self, public_ip: Ipv4Addr) -> Result<(), BackendError> {
        self.public_ip = public_ip;
        Ok(())
    }

    fn activate_ipv6(&mut self, _subnet: Ipv6Network, _network: Ipv6Network) -> Result<(), BackendError> {
        if self.public_ipv6.is_none() {
            return Err(BackendError::Unavailable(
                "host-gw was started without a PublicIPv6".into(),
            ));
        }
        netdev::sysctl_set("net/ipv6/conf/all/forwarding", "1")?;
        // As in `activate`, for an IPv6-only network (where that is not called).
        for peer in self.peers.values() {
            self.install(peer)?;
        }
        Ok(())
    }

    fn set_peer(&mut self, peer: &Peer) -> Result<(), BackendError> {
        let key = peer.key();
        if self.peers.get(&key) == Some(peer) {
            return Ok(());
        }
        self.install(peer)?;
        self.peers.insert(key, *peer);
        Ok(())
    }

    fn remove_peer(&mut self, key: SubnetKey) -> Result<(), BackendError> {
        if self.peers.remove(&key).is_some() {
            if let Some(v4) = key.ipv4_subnet() {
                super::remove_route_via_peer(v4, &self.underlay);
            }
            if let Some(v6) = key.ipv6 {
                super::remove_route_v6_via_peer(v6, &self.underlay);
            }
        }
        Ok(())
    }

    fn peers(&self) -> Vec<SubnetKey> {
        self.peers.keys().copied().collect()
    }

    fn describe(&self) -> String {
        format!("host-gw (via {})", self.underlay)
    }
}
