//! Taking over from flanneld on the same host, without a reboot. flanneld leaves its devices,
//! their routes and its rules when it stops. Its lease is ours already (same PublicIP) and its
//! iptables/nftables rules are the ones we write (same chains, replaced whole); what remains:
//! - its devices, whose per-peer routes are more specific than our network route and would
//!   keep traffic on flannel's path: removed once our datapath is attached, so traffic moves
//!   over in one step;
//! - host-gw's (and DirectRouting's) routes via peers' PublicIPs on the underlay: those of
//!   live peers are replaced by ours as the leases are applied; the rest (peers gone while
//!   flanneld was down, or a backend that no longer routes so) are removed after that;
//! - its VtepMAC, which our vxlan device takes over, so remote flannel hosts' neighbour and
//!   FDB entries for us stay valid.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ipnetwork::Ipv4Network;

use crate::{
    host::{MacAddr, netdev},
    subnet::{NetworkConfig, config::Backend},
};

/// flanneld's state found at start.
#[derive(Debug, Default)]
pub struct Leftovers {
    devices: Vec<String>,
    /// The MAC of `flannel.<VNI>`, flannel's VtepMAC in our lease.
    vtep_mac: Option<MacAddr>,
    routes: Vec<FlannelRoute>,
}

/// A route as flannel's host-gw writes it: a subnet of the network via a PublicIP on the
/// underlay, with the kernel's default protocol (flannel sets none), where ours carry
/// [`crate::backend::ROUTE_PROTO`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlannelRoute {
    pub subnet: Ipv4Network,
    pub via: Ipv4Addr,
}

/// The devices flanneld would have made for any backend (`flannel.<VNI>`, `flannel-v6.<VNI>`,
/// `flannel0`), and its routes via peers on `iface` to subnets of `network`.
pub fn find(config: &NetworkConfig, network: Option<Ipv4Network>, iface: &str) -> Leftovers {
    let mut names = vec![
        "flannel.1".to_string(),
        "flannel-v6.1".to_string(),
        "flannel0".to_string(),
    ];
    let mut vxlan_device = None;
    if let Backend::Vxlan { vni, .. } = config.backend {
        names.push(format!("flannel.{vni}"));
        names.push(format!("flannel-v6.{vni}"));
        vxlan_device = Some(format!("flannel.{vni}"));
    }
    names.sort();
    names.dedup();
    let devices: Vec<String> = names.into_iter().filter(|n| netdev::link_exists(n)).collect();
    let vtep_mac = vxlan_device
        .filter(|d| devices.contains(d))
        .and_then(|d| netdev::link_info(&d).ok())
        .filter(|l| l.kind.as_deref() == Some("vxlan"))
        .and_then(|l| l.mac);
    let routes = network
        .and_then(|network| {
            let json = netdev::ip(&["-j", "-4", "route", "show", "dev", iface, "proto", "boot"]).ok()?;
            Some(flannel_routes(&json, network))
        })
        .unwrap_or_default();
    Leftovers {
        devices,
        vtep_mac,
        routes,
    }
}

/// The routes of `ip -j route show dev <iface> proto boot` that flannel's host-gw would have
/// written: a gateway, and a destination inside `network` but not the network itself.
fn flannel_routes(json: &str, network: Ipv4Network) -> Vec<FlannelRoute> {
    let Ok(serde_json::Value::Array(routes)) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    routes
        .iter()
        .filter_map(|r| {
            let subnet: Ipv4Network = r["dst"].as_str()?.parse().ok()?;
            let via: Ipv4Addr = r["gateway"].as_str()?.parse().ok()?;
            let inside = network.contains(subnet.network()) && subnet.prefix() > network.prefix();
            inside.then_some(FlannelRoute { subnet, via })
        })
        .collect()
}

impl Leftovers {
    /// flannel's VtepMAC on this host, for our vxlan device to keep.
    pub fn vtep_mac(&self) -> Option<MacAddr> {
        self.vtep_mac
    }
}

/// Remove the devices our backend does not use itself (`ours` names its devices, as in
/// `Backend::describe`: the kernel fallbacks reuse flannel's device names), one log line each.
/// Returns flannel's routes, to go once the leases are applied ([`Routes::remove_if_due`]).
pub fn finish(leftovers: Leftovers, ours: &str, iface: &str) -> Routes {
    for device in leftovers.devices {
        if ours.contains(&device) {
            tracing::info!(%device, "took over flannel's device: our datapath uses it as it is");
            continue;
        }
        match netdev::delete_link(&device) {
            Ok(()) => tracing::info!(%device, "took over from flannel: removed its device and the routes through it"),
            Err(e) => tracing::warn!(%device, "removing flannel's device failed: {e}"),
        }
    }
    Routes {
        routes: leftovers.routes,
        iface: iface.to_string(),
        since: Instant::now(),
    }
}

/// flannel's routes found at start, removed once our peers are in place.
pub struct Routes {
    routes: Vec<FlannelRoute>,
    iface: String,
    since: Instant,
}

/// Time for the first listing of leases to be applied (it takes milliseconds).
const SETTLE: Duration = Duration::from_secs(1);

impl Routes {
    /// Once the leases are applied (`settled`, and a moment after start), remove those of
    /// flannel's routes that are still flannel's: a live peer's was replaced by ours (host-gw,
    /// DirectRouting), and a delete that names flannel's protocol leaves ours alone.
    pub fn remove_if_due(&mut self, settled: bool) {
        if self.routes.is_empty() || !settled || self.since.elapsed() < SETTLE {
            return;
        }
        for r in std::mem::take(&mut self.routes) {
            let (subnet, via) = (r.subnet.to_string(), r.via.to_string());
            let deleted = netdev::ip(&[
                "route", "del", &subnet, "via", &via, "dev", &self.iface, "proto", "boot",
            ]);
            if deleted.is_ok() {
                tracing::info!(%subnet, %via, "took over from flannel: removed its route");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_routes_are_gateway_routes_into_the_network() {
        let json = r#"[
            {"dst":"10.244.2.0/24","gateway":"192.168.1.2","dev":"eth0","flags":[]},
            {"dst":"10.244.0.0/16","gateway":"192.168.1.9","dev":"eth0","flags":[]},
            {"dst":"10.245.2.0/24","gateway":"192.168.1.2","dev":"eth0","flags":[]},
            {"dst":"10.244.3.0/24","dev":"eth0","prefsrc":"10.244.3.1","flags":[]},
            {"dst":"default","gateway":"192.168.1.1","dev":"eth0","flags":[]}
        ]"#;
        let network: Ipv4Network = "10.244.0.0/16".parse().unwrap();
        assert_eq!(
            flannel_routes(json, network),
            vec![FlannelRoute {
                subnet: "10.244.2.0/24".parse().unwrap(),
                via: "192.168.1.2".parse().unwrap(),
            }]
        );
        assert!(flannel_routes("not json", network).is_empty());
    }
}
