//! flannel's vxlan `DirectRouting`: a peer whose PublicIP this host reaches without a gateway
//! (same layer 2) gets a plain route to its subnet via that PublicIP, as host-gw does, so our
//! packets to it go unencapsulated; peers behind a gateway keep the vxlan path. Decided once
//! per PublicIP from `ip route get`, as flannel decides it when the lease arrives.
//!
//! Every peer stays programmed in the wrapped backend too: a peer may still send to us
//! encapsulated (its route to us can go through a gateway), and our decapsulation accepts
//! only known peers. The direct route is more specific than the network route to our device,
//! and replaces the kernel vxlan backend's route for that subnet.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use ipnetwork::Ipv4Network;

use super::{Backend, BackendError, Peer};
use crate::{
    host::{Counters, netdev},
    subnet::{LeaseAttrs, SubnetKey},
};

pub struct DirectRouting {
    inner: Box<dyn Backend>,
    underlay: String,
    on_link: HashMap<Ipv4Addr, bool>,
    /// Peers as last applied, and whether they got a direct route.
    applied: BTreeMap<Ipv4Network, (Peer, bool)>,
}

impl DirectRouting {
    pub fn new(inner: Box<dyn Backend>, underlay: &str) -> Self {
        DirectRouting {
            inner,
            underlay: underlay.to_string(),
            on_link: HashMap::new(),
            applied: BTreeMap::new(),
        }
    }

    /// Whether `ip` is reached on our underlay without a gateway.
    fn is_on_link(&mut self, ip: Ipv4Addr) -> bool {
        if let Some(known) = self.on_link.get(&ip) {
            return *known;
        }
        let route = netdev::ip(&["-j", "-4", "route", "get", &ip.to_string()])
            .ok()
            .and_then(|out| serde_json::from_str::<serde_json::Value>(&out).ok())
            .and_then(|v| v.as_array().and_then(|r| r.first()).cloned());
        let Some(route) = route else {
            // Unknown now: encapsulate, and ask again next time.
            return false;
        };
        let direct = route["gateway"].is_null() && route["dev"].as_str() == Some(self.underlay.as_str());
        tracing::info!(peer = %ip, direct, "DirectRouting: peer {}", if direct { "on our link, routed without encapsulation" } else { "behind a gateway, encapsulated" });
        self.on_link.insert(ip, direct);
        direct
    }
}

impl Backend for DirectRouting {
    fn lease_attrs(&self) -> LeaseAttrs {
        self.inner.lease_attrs()
    }

    fn mtu(&self) -> u32 {
        self.inner.mtu()
    }

    fn activate(&mut self, subnet: Ipv4Network, network: Ipv4Network) -> Result<(), BackendError> {
        self.inner.activate(subnet, network)
    }

    fn set_public_ip(&mut self, public_ip: Ipv4Addr) -> Result<(), BackendError> {
        // Which peers are on our link may have changed with our address: ask again.
        self.on_link.clear();
        self.inner.set_public_ip(public_ip)
    }

    fn set_peer(&mut self, peer: &Peer) -> Result<(), BackendError> {
        if self.applied.get(&peer.subnet).is_some_and(|(p, _)| p == peer) {
            return Ok(());
        }
        self.inner.set_peer(peer)?;
        // IPv6 stays encapsulated (flannel's v6 direct routes are not done here).
        let direct = peer.ipv4().is_some() && self.is_on_link(peer.public_ip);
        if direct {
            super::route_via_peer(peer, &self.underlay)?;
        } else if self
            .applied
            .get(&peer.subnet)
            .is_some_and(|(_, was_direct)| *was_direct)
        {
            super::remove_route_via_peer(peer.subnet, &self.underlay);
        }
        self.applied.insert(peer.subnet, (*peer, direct));
        Ok(())
    }

    fn remove_peer(&mut self, key: SubnetKey) -> Result<(), BackendError> {
        if let Some((_, true)) = self.applied.remove(&key.ipv4) {
            super::remove_route_via_peer(key.ipv4, &self.underlay);
        }
        self.inner.remove_peer(key)
    }

    fn peers(&self) -> Vec<SubnetKey> {
        self.inner.peers()
    }

    fn tick(&mut self) {
        self.inner.tick();
    }

    fn counters(&mut self) -> Option<Counters> {
        self.inner.counters()
    }

    fn capabilities(&self) -> Option<serde_json::Value> {
        self.inner.capabilities()
    }

    fn describe(&self) -> String {
        format!("{}, DirectRouting", self.inner.describe())
    }
}
