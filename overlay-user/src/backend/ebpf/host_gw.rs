//! eBPF host-gw: flannel's host-gw (a route to each peer's subnet via its PublicIP, which stays
//! the stack's path) with host routing's shortcut on both ends and no encapsulation: a
//! container's packet to a peer's subnet leaves from its veth straight to the underlay, the
//! peer's PublicIP as next hop; one from a peer's subnet to a local container goes from the
//! underlay straight into the container's namespace. Nothing is pinned: while no agent runs, the
//! kernel's routes carry the traffic.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnetwork::{Ipv4Network, Ipv6Network};
use overlay_common::{DatapathConfig, HostRoutingMode};

use super::{
    HostRouting, Programs,
    attach::remove_clsact_if_ours,
    bridge::{BridgeDevice, BridgeFinder, Mirror, fdb},
    host_routing::HostRoutingState,
};
use crate::{
    backend::{Backend, BackendError, Peer, host_gw::HostGw},
    host::{Counters, netdev},
    subnet::{LeaseAttrs, SubnetKey},
};

pub struct EbpfHostGw {
    kernel: HostGw,
    programs: Programs,
    underlay: netdev::LinkInfo,
    public_ip: Ipv4Addr,
    choice: HostRouting,
    state: HostRoutingState,
    started: bool,
    subnet: Option<Ipv4Network>,
    bridges: BridgeFinder,
    bridge: Option<(BridgeDevice, Mirror)>,
    bridge_warning: Option<String>,
    peers: HashMap<SubnetKey, Peer>,
    clsact_created: Vec<String>,
}

impl EbpfHostGw {
    /// Unavailable where the host-routing programs do not load (the agent then runs the
    /// kernel's host-gw alone).
    pub fn new(
        underlay: &str,
        public_ip: Ipv4Addr,
        public_ipv6: Option<Ipv6Addr>,
        choice: HostRouting,
    ) -> Result<Self, BackendError> {
        let kernel = HostGw::new(underlay, public_ip, public_ipv6)?;
        let programs =
            Programs::load().map_err(|e| BackendError::Unavailable(format!("eBPF programs do not load: {e}")))?;
        if let Some(why) = programs.host_routing_refused() {
            return Err(BackendError::Unavailable(why.to_string()));
        }
        Ok(EbpfHostGw {
            kernel,
            programs,
            underlay: netdev::link_info(underlay)?,
            public_ip,
            choice,
            state: HostRoutingState::default(),
            started: false,
            subnet: None,
            bridges: BridgeFinder::default(),
            bridge: None,
            bridge_warning: None,
            peers: HashMap::new(),
            clsact_created: Vec::new(),
        })
    }

    fn sync_bridge(&mut self) -> Result<(), String> {
        let Some(subnet) = self.subnet else { return Ok(()) };
        if self.state.off.is_some() {
            return Ok(());
        }
        let found = self.bridges.find(subnet.into(), "");
        if self.bridge.as_ref().map(|(d, _)| d) != found.as_ref() {
            self.drop_bridge();
            let Some(device) = found else { return Ok(()) };
            tracing::info!(bridge = %device.name, "host routing follows the container bridge");
            self.bridge = Some((device, Mirror::default()));
        }
        let Some((device, mirror)) = self.bridge.as_mut() else {
            return Ok(());
        };
        let device = device.clone();
        let fdb =
            fdb(device.ifindex).map_err(|e| format!("reading the forwarding database of {}: {e}", device.name))?;
        self.programs
            .sync_bridge_fdb(mirror, &fdb)
            .map_err(|e| format!("copying the forwarding database of {}: {e}", device.name))?;
        let mtu = self.kernel.mtu();
        self.state
            .sync(&mut self.programs, &device, &fdb, subnet, HostRoutingMode::Route, mtu)
    }

    fn drop_bridge(&mut self) {
        self.state.stop_ports(&mut self.programs);
        if let Some((device, mut mirror)) = self.bridge.take() {
            if let Err(e) = self.programs.sync_bridge_fdb(&mut mirror, &HashMap::new()) {
                tracing::warn!("clearing the bridge maps: {e}");
            }
            tracing::info!(bridge = %device.name, "host routing left the container bridge");
        }
    }
}

impl Backend for EbpfHostGw {
    fn lease_attrs(&self) -> LeaseAttrs {
        self.kernel.lease_attrs()
    }

    fn mtu(&self) -> u32 {
        self.kernel.mtu()
    }

    fn set_public_ip(&mut self, public_ip: Ipv4Addr) -> Result<(), BackendError> {
        self.kernel.set_public_ip(public_ip)?;
        self.public_ip = public_ip;
        Ok(())
    }

    fn activate(&mut self, subnet: Ipv4Network, network: Ipv4Network) -> Result<(), BackendError> {
        self.kernel.activate(subnet, network)?;
        // A re-created underlay (new ifindex) took the program on its ingress with it: start
        // host routing again on the new device.
        let underlay = netdev::link_info(&self.underlay.name)?;
        if underlay.ifindex != self.underlay.ifindex && self.started {
            tracing::info!(underlay = %underlay.name, "host routing follows the re-created underlay");
            self.drop_bridge();
            self.state.stop(&mut self.programs);
            self.started = false;
        }
        self.underlay = underlay;
        self.programs.set_config(&DatapathConfig {
            public_ip: self.public_ip.octets(),
            subnet_addr: subnet.network().octets(),
            subnet_prefix_len: subnet.prefix(),
            // No wire format: the tunnel programs are not attached, and would pass everything.
            format: 0,
            port: 0,
            vni: 0,
            vtep_mac: [0; 6],
            _pad: [0; 2],
            underlay_ifindex: self.underlay.ifindex,
        })?;
        if self.subnet != Some(subnet) {
            self.drop_bridge();
        }
        self.subnet = Some(subnet);
        if !self.started {
            if let Some(iface) = self.state.start(&mut self.programs, self.choice, &self.underlay.name) {
                self.clsact_created.push(iface);
            }
            self.started = true;
        }
        Ok(())
    }

    fn set_peer(&mut self, peer: &Peer) -> Result<(), BackendError> {
        self.kernel.set_peer(peer)?;
        if self.peers.get(&peer.key()) != Some(peer) {
            if let Some(old) = self.peers.remove(&peer.key()) {
                self.programs.remove_peer(&old)?;
            }
            self.programs.upsert_peer(peer)?;
            self.peers.insert(peer.key(), *peer);
        }
        Ok(())
    }

    fn remove_peer(&mut self, key: SubnetKey) -> Result<(), BackendError> {
        self.kernel.remove_peer(key)?;
        if let Some(old) = self.peers.remove(&key) {
            self.programs.remove_peer(&old)?;
        }
        Ok(())
    }

    /// IPv6 goes by the kernel's routes alone: host routing is IPv4.
    fn activate_ipv6(&mut self, subnet: Ipv6Network, network: Ipv6Network) -> Result<(), BackendError> {
        self.kernel.activate_ipv6(subnet, network)
    }

    fn peers(&self) -> Vec<SubnetKey> {
        self.kernel.peers()
    }

    fn tick(&mut self) {
        match self.sync_bridge() {
            Ok(()) => self.bridge_warning = None,
            Err(why) => {
                if self.bridge_warning.as_ref() != Some(&why) {
                    tracing::warn!("{why}");
                    self.bridge_warning = Some(why);
                }
            }
        }
    }

    fn counters(&mut self) -> Option<Counters> {
        self.programs.counters().ok()
    }

    fn describe(&self) -> String {
        format!(
            "ebpf-host-gw (via {}, host routing {})",
            self.underlay.name,
            self.state.description()
        )
    }
}

impl Drop for EbpfHostGw {
    fn drop(&mut self) {
        self.drop_bridge();
        self.state.stop(&mut self.programs);
        for iface in self.clsact_created.drain(..) {
            remove_clsact_if_ours(&iface);
        }
    }
}
