//! flannel's vxlan `DirectRouting`: a peer whose PublicIP this host reaches without a gateway
//! (same layer 2) gets a plain route to its subnet via that PublicIP, as host-gw does, so our
//! packets to it go unencapsulated; peers behind a gateway keep the vxlan path. The same for
//! IPv6, per family as flannel decides it: the peer's IPv6 subnet via its PublicIPv6 when that
//! address is on our link. Decided once per address from `ip route get`, as flannel decides it
//! when the lease arrives.
//!
//! Every peer stays programmed in the wrapped backend too: a peer may still send to us
//! encapsulated (its route to us can go through a gateway), and our decapsulation accepts
//! only known peers. The direct route is more specific than the network route to our device,
//! and replaces the kernel vxlan backend's route for that subnet.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use ipnetwork::{Ipv4Network, Ipv6Network};

use super::{Backend, BackendError, Peer};
use crate::{
    host::{Counters, netdev},
    subnet::{LeaseAttrs, SubnetKey},
};

pub struct DirectRouting {
    inner: Box<dyn Backend>,
    underlay: String,
    on_link: HashMap<IpAddr, bool>,
    /// Peers as last applied, and which of their families got a direct route.
    applied: BTreeMap<SubnetKey, (Peer, Direct)>,
}

/// Which families of a peer are routed directly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Direct {
    v4: bool,
    v6: bool,
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
    fn is_on_link(&mut self, ip: IpAddr) -> bool {
        if let Some(known) = self.on_link.get(&ip) {
            return *known;
        }
        let family = if ip.is_ipv4() { "-4" } else { "-6" };
        let route = netdev::ip(&["-j", family, "route", "get", &ip.to_string()])
            .ok()
            .and_then(|out| serde_json::from_str::<serde_json::Value>(&out).ok())
            .and_then(|v| v.as_array().and_then(|r| r.first()).cloned());
        let Some(route) = route else {
            // Unknown now: encapsulate, and ask again next time.
            return false;
        };
        let direct = is_direct(&route, &self.underlay);
        tracing::info!(peer = %ip, direct, "DirectRouting: peer {}", if direct { "on our link, routed without encapsulation" } else { "behind a gateway, encapsulated" });
        self.on_link.insert(ip, direct);
        direct
    }

    /// Which of `peer`'s families go direct: those whose PublicIP (PublicIPv6) is on our link.
    fn direct_families(&mut self, peer: &Peer) -> Direct {
        Direct {
            v4: peer.ipv4().is_some() && self.is_on_link(peer.public_ip.into()),
            v6: peer.ipv6.is_some_and(|v6| self.is_on_link(v6.public_ip.into())),
        }
    }
}

/// Whether a route from `ip -j route get` leaves on `underlay` without a gateway: the peer
/// shares our link.
fn is_direct(route: &serde_json::Value, underlay: &str) -> bool {
    route["gateway"].is_null() && route["dev"].as_str() == Some(underlay)
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

    fn activate_ipv6(&mut self, subnet: Ipv6Network, network: Ipv6Network) -> Result<(), BackendError> {
        self.inner.activate_ipv6(subnet, network)
    }

    fn set_peer(&mut self, peer: &Peer) -> Result<(), BackendError> {
        let key = peer.key();
        if self.applied.get(&key).is_some_and(|(p, _)| p == peer) {
            return Ok(());
        }
        self.inner.set_peer(peer)?;
        let was = self.applied.get(&key).map(|(_, d)| *d).unwrap_or_default();
        let direct = self.direct_families(peer);
        match (direct.v4, was.v4, peer.ipv4()) {
            (true, _, Some(_)) => super::route_via_peer(peer, &self.underlay)?,
            (false, true, Some(v4)) => super::remove_route_via_peer(v4, &self.underlay),
            _ => {}
        }
        match (direct.v6, was.v6, &peer.ipv6) {
            (true, _, Some(v6)) => super::route_v6_via_peer(v6, &self.underlay)?,
            (false, true, Some(v6)) => super::remove_route_v6_via_peer(v6.subnet, &self.underlay),
            _ => {}
        }
        self.applied.insert(key, (*peer, direct));
        Ok(())
    }

    fn remove_peer(&mut self, key: SubnetKey) -> Result<(), BackendError> {
        if let Some((peer, direct)) = self.applied.remove(&key) {
            if let (true, Some(v4)) = (direct.v4, peer.ipv4()) {
                super::remove_route_via_peer(v4, &self.underlay);
            }
            if let (true, Some(v6)) = (direct.v6, peer.ipv6) {
                super::remove_route_v6_via_peer(v6.subnet, &self.underlay);
            }
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// `ip -j route get` as iproute2 prints it for a neighbour on the link and for an address
    /// behind a router, in both families.
    #[test]
    fn direct_only_without_a_gateway_on_our_underlay() {
        let on_link = json!({"dst": "192.168.250.2", "dev": "eth0", "prefsrc": "192.168.250.1", "flags": [], "uid": 0, "cache": []});
        let via_router =
            json!({"dst": "192.168.250.3", "gateway": "192.168.250.2", "dev": "eth0", "prefsrc": "192.168.250.1"});
        let on_link6 = json!({"dst": "fd01::2", "dev": "eth0", "prefsrc": "fd01::1", "metric": 256, "flags": [], "pref": "medium"});
        let via_router6 =
            json!({"dst": "fd01::3", "gateway": "fd01::2", "dev": "eth0", "prefsrc": "fd01::1", "metric": 1024});
        let other_link6 = json!({"dst": "fd02::2", "dev": "eth1", "prefsrc": "fd02::1"});
        assert!(is_direct(&on_link, "eth0"));
        assert!(is_direct(&on_link6, "eth0"));
        assert!(!is_direct(&via_router, "eth0"));
        assert!(!is_direct(&via_router6, "eth0"));
        assert!(!is_direct(&other_link6, "eth0"), "on a link, but not the underlay");
        assert!(!is_direct(&json!({}), "eth0"));
    }
}
