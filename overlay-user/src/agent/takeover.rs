//! Taking over from flanneld on the same host, without a reboot. flanneld leaves its devices,
//! their routes and its rules when it stops. Its lease is ours already (same PublicIP) and its
//! iptables/nftables rules are the ones we write (same chains, replaced whole); what remains
//! are its devices, whose per-peer routes are more specific than our network route and would
//! keep traffic on flannel's path. They are removed once our datapath is attached, so traffic
//! moves over in one step.
use crate::{host::netdev, subnet::NetworkConfig, subnet::config::Backend};

/// flanneld's devices found at start.
#[derive(Debug, Default)]
pub struct Leftovers {
    devices: Vec<String>,
}

/// The devices flanneld would have made for any backend (`flannel.<VNI>`, `flannel0`).
pub fn find(config: &NetworkConfig) -> Leftovers {
    let mut names = vec!["flannel.1".to_string(), "flannel0".to_string()];
    if let Backend::Vxlan { vni, .. } = config.backend {
        names.push(format!("flannel.{vni}"));
    }
    names.sort();
    names.dedup();
    Leftovers {
        devices: names.into_iter().filter(|n| netdev::link_exists(n)).collect(),
    }
}

/// Remove the leftovers our backend does not use itself (`ours` names its devices, as in
/// `Backend::describe`: the kernel fallbacks reuse flannel's device names), one log line each.
pub fn finish(leftovers: Leftovers, ours: &str) {
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
}
