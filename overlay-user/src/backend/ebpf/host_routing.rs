//! Host routing, the agent's half (the programs are overlay-ebpf's `host_routing.rs`): attach
//! `overlay_to_container` to the underlay's TC ingress and `overlay_from_container` to each
//! port of the container bridge, and keep the local endpoints (container IPv4 -> port, MAC)
//! equal to what the bridge knows: its neighbour table (IPv4 -> MAC) joined with its
//! forwarding database (MAC -> port), read once a second with the bridge. A restarted
//! container (new veth, same IP, new MAC) or a moved MAC is followed at the next reading; a
//! deleted port at once (the programs check the bridge's port map, which the kernel keeps).
//! Until a container is known its packets take the stack's path, which works as before.
use std::{
    collections::{HashMap, HashSet},
    ffi::CStr,
    net::Ipv4Addr,
};

use aya::maps::{Array, HashMap as BpfHashMap};
use overlay_common::{
    HostRoutingConfig, HostRoutingMode, LocalEndpoint, MAP_HOST_ROUTING, MAP_LOCAL_ENDPOINTS, PROG_FROM_CONTAINER,
    PROG_TO_CONTAINER,
};

use super::{
    Datapath,
    attach::{OwnedLink, remove_clsact_if_ours},
    bridge::{self, BridgeDevice},
    programs::{DatapathError, Programs, not_found, typed_map},
};
use crate::host::{MacAddr, netdev};

/// `--host-routing`: whether container traffic between hosts may skip the host's stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HostRouting {
    /// Where the kernel has the helpers (bpf_redirect_peer, bpf_redirect_neigh: 5.10): packets
    /// between a local container and a peer skip the bridge, IP forwarding and netfilter.
    #[default]
    Bpf,
    /// Every packet through the host's stack, as before.
    Kernel,
}

/// Host routing on this host: whether it is on, and what it has attached and written.
#[derive(Default)]
pub(super) struct HostRoutingState {
    /// Some(why) when off.
    pub off: Option<String>,
    /// `overlay_to_container` on the underlay's TC ingress.
    underlay_link: Option<OwnedLink>,
    /// Ports with `overlay_from_container` on their ingress, by ifindex.
    ports: HashMap<u32, PortLink>,
    /// Whether a port (by ifindex) is a veth: only a veth's peer can be entered directly.
    veth: HashMap<u32, bool>,
    /// What the endpoint map holds.
    endpoints: HashMap<Ipv4Addr, LocalEndpoint>,
    /// What the config map holds.
    config: Option<HostRoutingConfig>,
}

struct PortLink {
    name: String,
    link: OwnedLink,
    clsact_created: bool,
}

impl Programs {
    pub fn set_host_routing(&mut self, cfg: &HostRoutingConfig) -> Result<(), DatapathError> {
        let mut map: Array<_, HostRoutingConfig> = typed_map(&mut self.ebpf, MAP_HOST_ROUTING)?;
        map.set(0, cfg, 0).map_err(|source| DatapathError::Map {
            name: MAP_HOST_ROUTING,
            source,
        })
    }

    /// Make the endpoint map hold `wanted`; `mirror` is what it holds and follows each write.
    pub fn sync_local_endpoints(
        &mut self,
        mirror: &mut HashMap<Ipv4Addr, LocalEndpoint>,
        wanted: &HashMap<Ipv4Addr, LocalEndpoint>,
    ) -> Result<(), DatapathError> {
        let mut map: BpfHashMap<_, [u8; 4], LocalEndpoint> = typed_map(&mut self.ebpf, MAP_LOCAL_ENDPOINTS)?;
        let err = |source| DatapathError::Map {
            name: MAP_LOCAL_ENDPOINTS,
            source,
        };
        // Departed first: an address is never left pointing at a port it has left.
        let gone: Vec<Ipv4Addr> = mirror.keys().filter(|ip| !wanted.contains_key(ip)).copied().collect();
        for ip in gone {
            match map.remove(&ip.octets()) {
                Err(source) if !not_found(&source) => return Err(err(source)),
                _ => {}
            }
            mirror.remove(&ip);
        }
        for (ip, endpoint) in wanted {
            if mirror.get(ip) == Some(endpoint) {
                continue;
            }
            map.insert(ip.octets(), *endpoint, 0).map_err(err)?;
            mirror.insert(*ip, *endpoint);
        }
        Ok(())
    }
}

/// The local endpoints the bridge knows: each neighbour in `subnet` whose MAC the forwarding
/// database puts on a veth port.
pub fn local_endpoints(
    subnet: ipnetwork::Ipv4Network,
    neighbours: &HashMap<Ipv4Addr, MacAddr>,
    fdb: &HashMap<MacAddr, u32>,
    is_veth: impl Fn(u32) -> bool,
) -> HashMap<Ipv4Addr, LocalEndpoint> {
    neighbours
        .iter()
        .filter(|(ip, _)| subnet.contains(**ip) && **ip != subnet.network() && **ip != subnet.broadcast())
        .filter_map(|(ip, mac)| {
            let port = *fdb.get(mac)?;
            is_veth(port).then_some((
                *ip,
                LocalEndpoint {
                    port_ifindex: port,
                    mac: mac.0,
                    _pad: [0; 2],
                },
            ))
        })
        .collect()
}

fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// The MAC of interface `name`, from the kernel's interface list.
fn link_mac(name: &str) -> Option<MacAddr> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address.as_ref()?.as_link_addr()?.addr())
        .map(MacAddr)
}

impl HostRoutingState {
    /// Decide host routing once, log the choice and its reason, and attach the underlay's half
    /// (`overlay_to_container` on its TC ingress). Returns the interface whose clsact qdisc it
    /// created, if it did.
    pub(super) fn start(&mut self, programs: &mut Programs, choice: HostRouting, underlay: &str) -> Option<String> {
        let mut created_on = None;
        let reason = match (choice, programs.host_routing_refused.clone()) {
            (HostRouting::Kernel, _) => Some("--host-routing=kernel".to_string()),
            (HostRouting::Bpf, Some(why)) => Some(format!("this kernel refuses the host-routing programs: {why}")),
            (HostRouting::Bpf, None) => {
                match programs.attach_tc(PROG_TO_CONTAINER, underlay, aya::programs::TcAttachType::Ingress) {
                    Ok((link, _, created)) => {
                        self.underlay_link = Some(link);
                        created_on = created.then(|| underlay.to_string());
                        None
                    }
                    Err(e) => Some(format!("attaching to the underlay failed: {e}")),
                }
            }
        };
        match &reason {
            None => tracing::info!(
                "host routing: bpf (packets between local containers and peers skip the host's stack, \
                 netfilter included)"
            ),
            Some(why) => tracing::info!(reason = %why, "host routing: kernel (every packet through the host's stack)"),
        }
        self.off = reason;
        created_on
    }

    /// `bpf`, or `kernel (why)`.
    pub fn description(&self) -> String {
        match &self.off {
            None => "bpf".into(),
            Some(why) => format!("kernel ({why})"),
        }
    }

    /// With the bridge read (`fdb`, already copied into the bridge maps): the config, the
    /// programs on its ports and the endpoints follow it. `mtu`: the largest packet sent whole.
    pub(super) fn sync(
        &mut self,
        programs: &mut Programs,
        device: &BridgeDevice,
        fdb: &HashMap<MacAddr, u32>,
        subnet: ipnetwork::Ipv4Network,
        mode: HostRoutingMode,
        mtu: u32,
    ) -> Result<(), String> {
        if self.off.is_some() {
            return Ok(());
        }
        // The bridge's MAC changes as ports come and go unless someone set it: read it each time.
        let bridge_mac = link_mac(&device.name).ok_or_else(|| format!("no MAC on the bridge {}", device.name))?;
        let config = HostRoutingConfig {
            bridge_mac: bridge_mac.0,
            mode: mode as u8,
            _pad: 0,
            mtu,
        };
        if self.config != Some(config) {
            programs
                .set_host_routing(&config)
                .map_err(|e| format!("host routing config: {e}"))?;
            self.config = Some(config);
        }

        let wanted: HashSet<u32> = fdb.values().copied().collect();
        let gone: Vec<u32> = self.ports.keys().filter(|p| !wanted.contains(p)).copied().collect();
        for port in gone {
            self.detach_port(programs, port);
        }
        let mut failed = None;
        for &port in &wanted {
            if self.ports.contains_key(&port) {
                continue;
            }
            let Some(name) = ifname(port) else { continue };
            let veth = netdev::link_info(&name).map(|l| l.is_veth()).unwrap_or(false);
            self.veth.insert(port, veth);
            match programs.attach_tc(PROG_FROM_CONTAINER, &name, aya::programs::TcAttachType::Ingress) {
                Ok((link, _, clsact_created)) => {
                    tracing::debug!(port = %name, "host routing on the container's port");
                    self.ports.insert(
                        port,
                        PortLink {
                            name,
                            link,
                            clsact_created,
                        },
                    );
                }
                Err(e) => {
                    failed.get_or_insert(format!("host routing on port {name}: {e}"));
                }
            }
        }
        self.veth.retain(|p, _| wanted.contains(p));

        let neighbours = bridge::neighbours(device.ifindex)
            .map_err(|e| format!("reading the neighbours of {}: {e}", device.name))?;
        let veth = &self.veth;
        let endpoints = local_endpoints(subnet, &neighbours, fdb, |p| veth.get(&p) == Some(&true));
        programs
            .sync_local_endpoints(&mut self.endpoints, &endpoints)
            .map_err(|e| format!("local endpoints: {e}"))?;
        failed.map_or(Ok(()), Err)
    }

    fn detach_port(&mut self, programs: &mut Programs, port: u32) {
        let Some(p) = self.ports.remove(&port) else { return };
        // A deleted port took our program with it.
        if let Err(e) = programs.detach(p.link) {
            tracing::debug!(port = %p.name, "detaching host routing: {e}");
        }
        if p.clsact_created {
            remove_clsact_if_ours(&p.name);
        }
    }

    /// Take host routing off the bridge's ports and forget the endpoints (the bridge went).
    pub(super) fn stop_ports(&mut self, programs: &mut Programs) {
        let ports: Vec<u32> = self.ports.keys().copied().collect();
        for port in ports {
            self.detach_port(programs, port);
        }
        self.veth.clear();
        let mut endpoints = std::mem::take(&mut self.endpoints);
        if let Err(e) = programs.sync_local_endpoints(&mut endpoints, &HashMap::new()) {
            tracing::warn!("clearing the local endpoints: {e}");
        }
    }

    /// Everything host routing attached goes.
    pub(super) fn stop(&mut self, programs: &mut Programs) {
        self.stop_ports(programs);
        if let Some(link) = self.underlay_link.take()
            && let Err(e) = programs.detach(link)
        {
            tracing::debug!("detaching host routing from the underlay: {e}");
        }
    }
}

impl Datapath {
    pub(super) fn start_host_routing(&mut self) {
        if self.ipv4.is_none() {
            let why = "host routing is IPv4 only and this network is IPv6-only";
            tracing::info!(
                reason = why,
                "host routing: kernel (every packet through the host's stack)"
            );
            self.host_routing.off = Some(why.into());
            return;
        }
        let underlay = self.underlay.name.clone();
        if let Some(iface) = self
            .host_routing
            .start(&mut self.programs, self.spec.host_routing, &underlay)
        {
            self.clsact_created.push(iface);
        }
    }

    /// `bpf`, or `kernel (why)`.
    pub fn host_routing_description(&self) -> String {
        self.host_routing.description()
    }

    pub(super) fn sync_host_routing(
        &mut self,
        device: &BridgeDevice,
        fdb: &HashMap<MacAddr, u32>,
    ) -> Result<(), String> {
        // Never on without IPv4 (see `start_host_routing`).
        let Some(v4) = self.ipv4 else { return Ok(()) };
        let (subnet, mtu) = (v4.subnet, self.overlay.mtu);
        self.host_routing
            .sync(&mut self.programs, device, fdb, subnet, HostRoutingMode::Encap, mtu)
    }

    pub(super) fn stop_host_routing_ports(&mut self) {
        self.host_routing.stop_ports(&mut self.programs);
    }

    pub(super) fn stop_host_routing(&mut self) {
        self.host_routing.stop(&mut self.programs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_join_neighbours_and_ports() {
        let subnet: ipnetwork::Ipv4Network = "10.244.1.0/24".parse().unwrap();
        let a = MacAddr([2, 0, 0, 0, 0, 1]);
        let b = MacAddr([2, 0, 0, 0, 0, 2]);
        let c = MacAddr([2, 0, 0, 0, 0, 3]);
        let neighbours = HashMap::from([
            (Ipv4Addr::new(10, 244, 1, 2), a),
            // No port for its MAC (a container gone, its neighbour entry not yet).
            (Ipv4Addr::new(10, 244, 1, 3), b),
            // Outside our subnet.
            (Ipv4Addr::new(192, 168, 0, 9), a),
            // On a port that is no veth.
            (Ipv4Addr::new(10, 244, 1, 4), c),
        ]);
        let fdb = HashMap::from([(a, 7), (c, 9)]);
        let got = local_endpoints(subnet, &neighbours, &fdb, |p| p == 7);
        assert_eq!(
            got,
            HashMap::from([(
                Ipv4Addr::new(10, 244, 1, 2),
                LocalEndpoint {
                    port_ifindex: 7,
                    mac: a.0,
                    _pad: [0; 2]
                }
            )])
        );
    }
}
