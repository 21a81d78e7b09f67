//! Our eBPF datapath, as an agent backend in either wire format and on its own
//! (`overlay datapath`).
//!
//! - [`programs`]: the object loaded into the kernel (verified, not attached), typed access to
//!   its maps. Loaded once per start.
//! - [`attach`]: the programs put on a host ([`Datapath`]): the overlay device whose egress
//!   encapsulates, XDP or TC ingress on the underlay that decapsulates, pinning and adoption.
//! - [`peers`]: the peer table in the maps.
//! - [`ipv6`]: IPv6 (VXLAN over IPv6, flannel's `flannel-v6.<VNI>`): its config, peers, route.
//! - [`bridge`]: the container bridge followed, its forwarding database mirrored for the
//!   program on its egress.
pub mod attach;
pub mod bridge;
pub mod capabilities;
pub mod host_gw;
pub mod host_routing;
pub mod ipv6;
pub mod peers;
pub mod programs;

use std::{collections::HashMap, net::Ipv6Addr};

pub use attach::{DatapathSpec, DecapAttach, DecapHook, XdpAttach, choose_decap};
use aya::programs::XdpMode;
pub use capabilities::Capabilities;
pub use host_gw::EbpfHostGw;
pub use host_routing::HostRouting;
use ipnetwork::{Ipv4Network, Ipv6Network};
pub use overlay_common::Format;
pub use programs::{DatapathError, Programs};

use super::{Backend, BackendError, Peer};
use crate::{
    host::{Counters, MacAddr, netdev},
    subnet::{BackendKind, LeaseAttrs, LeaseBackend, SubnetKey, VxlanData},
};

/// The datapath attached to this host. Dropping it detaches everything it attached and removes
/// the device it created, unless it is pinned.
pub struct Datapath {
    programs: Programs,
    spec: DatapathSpec,
    /// Our IPv4 side; None in an IPv6-only network.
    ipv4: Option<Ipv4Side>,
    overlay: netdev::LinkInfo,
    underlay: netdev::LinkInfo,
    decap_hook: DecapHook,
    /// The decap link was taken over from a previous run.
    decap_adopted: bool,
    /// None when an attachment was adopted from a previous run (its mode was chosen then), or
    /// decapsulation runs on TC.
    xdp_mode: Option<XdpMode>,
    links: Option<attach::Links>,
    /// What the peer maps hold.
    peers: HashMap<Ipv4Network, Peer>,
    /// Our IPv6 side and the v6 peer maps' contents, once enabled.
    ipv6: Option<ipv6::Ipv6Side>,
    bridges: bridge::BridgeFinder,
    /// The container bridge our egress program is on, with what its maps hold. Owned by this
    /// process, never pinned: without the agent to keep the FDB copy current, packets take
    /// the bridge's own path.
    bridge: Option<bridge::AttachedBridge>,
    /// The last bridge trouble logged.
    bridge_warning: Option<String>,
    /// How the TC programs are attached (probed at attach).
    tc_mode: Option<attach::TcMode>,
    /// Interfaces whose clsact qdisc we created (unpinned runs remove them when done).
    clsact_created: Vec<String>,
    /// Whether native XDP attached on the underlay (None: not tried).
    native_xdp: Option<bool>,
    /// Container traffic past the host's stack: on or off, and what it attached.
    host_routing: host_routing::HostRoutingState,
}

/// This host's IPv4 container subnet and the whole IPv4 overlay network (routed to the overlay
/// device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Side {
    pub subnet: Ipv4Network,
    pub network: Ipv4Network,
}

/// The lease backend kind a wire format speaks.
pub fn backend_kind(format: Format) -> BackendKind {
    match format {
        Format::Udp => BackendKind::Udp,
        Format::Vxlan => BackendKind::Vxlan,
    }
}

pub struct EbpfBackend {
    spec: DatapathSpec,
    /// Probed when the programs loaded; completed from the datapath once attached.
    capabilities: Capabilities,
    /// Loaded in [`EbpfBackend::new`], handed to the datapath on activation.
    programs: Option<Programs>,
    vtep_mac: MacAddr,
    mtu: u32,
    datapath: Option<Datapath>,
    /// Our PublicIPv6 when the network has IPv6 ([`EbpfBackend::with_public_ipv6`]).
    public_ipv6: Option<Ipv6Addr>,
}

impl EbpfBackend {
    /// Load the programs (so the agent can fall back before it leases if this kernel refuses
    /// them) and create the overlay device, whose MAC our lease publishes.
    pub fn new(spec: DatapathSpec) -> Result<Self, BackendError> {
        let mut programs = Programs::load_pinned(spec.pin_dir.as_deref())
            .map_err(|e| BackendError::Unavailable(format!("eBPF programs do not load: {e}")))?;
        let capabilities = programs
            .probe_capabilities()
            .map_err(|e| BackendError::Unavailable(format!("probing the kernel: {e}")))?;
        tracing::info!(capabilities = %capabilities.to_json(), "probed this kernel");
        let refused = match spec.format {
            Format::Vxlan if !capabilities.encap_vxlan => Some("BPF_F_ADJ_ROOM_ENCAP_L2_ETH (added in 5.13)"),
            Format::Udp if !capabilities.encap_udp => Some("the encap flags ENCAP_L3_IPV4 and ENCAP_L4_UDP (5.2)"),
            _ => None,
        };
        if let Some(what) = refused {
            return Err(BackendError::Unavailable(format!(
                "this kernel's bpf_skb_adjust_room refuses {what}, which the eBPF {} encapsulation needs",
                backend_kind(spec.format).name()
            )));
        }
        let underlay = netdev::link_info(&spec.underlay)?;
        let device = netdev::create_overlay_device(&spec.overlay_device, spec.vtep_mac)?;
        let vtep_mac = device.mac.unwrap_or_default();
        let mtu = spec.effective_mtu(underlay.mtu);
        Ok(EbpfBackend {
            spec,
            capabilities,
            programs: Some(programs),
            vtep_mac,
            mtu,
            datapath: None,
            public_ipv6: None,
        })
    }

    /// Carry IPv6 too, from `public_ipv6` (flannel's PublicIPv6), once the agent activates it
    /// with our IPv6 subnet. VXLAN only: flannel's udp backend has no IPv6. A spec whose
    /// PublicIP is 0.0.0.0 (flannel's in an IPv6-only network) carries IPv6 only.
    pub fn with_public_ipv6(mut self, public_ipv6: Option<Ipv6Addr>) -> Result<Self, BackendError> {
        if public_ipv6.is_some() && self.spec.format != Format::Vxlan {
            return Err(BackendError::Other(
                "EnableIPv6 with Backend.Type \"udp\": flannel's udp backend has no IPv6; use vxlan".into(),
            ));
        }
        if public_ipv6.is_none() && self.spec.public_ip.is_unspecified() {
            return Err(BackendError::Other(
                "the eBPF datapath needs a PublicIP, or a PublicIPv6 in an IPv6-only network".into(),
            ));
        }
        self.public_ipv6 = public_ipv6;
        if self.ipv6_only() {
            self.mtu = ipv6::ipv6_only_mtu(self.spec.mtu, netdev::link_info(&self.spec.underlay)?.mtu);
        }
        Ok(self)
    }

    /// An IPv6-only network (flannel's `EnableIPv4: false`): no IPv4 side at all.
    fn ipv6_only(&self) -> bool {
        self.spec.public_ip.is_unspecified() && self.public_ipv6.is_some()
    }

    /// The container MTU (`FLANNEL_MTU`) over an underlay of `underlay_mtu`.
    fn container_mtu(&self, underlay_mtu: u32) -> u32 {
        if self.ipv6_only() {
            ipv6::ipv6_only_mtu(self.spec.mtu, underlay_mtu)
        } else {
            self.spec.effective_mtu(underlay_mtu)
        }
    }

    fn datapath(&mut self) -> Result<&mut Datapath, BackendError> {
        self.datapath.as_mut().ok_or(BackendError::NotActive)
    }
}

impl Backend for EbpfBackend {
    fn lease_attrs(&self) -> LeaseAttrs {
        let backend = match self.spec.format {
            Format::Udp => LeaseBackend::Udp,
            // As flannel's vxlan lease in an IPv6-only network: no BackendData, the VtepMAC in
            // BackendV6Data only.
            Format::Vxlan if self.ipv6_only() => LeaseBackend::VxlanNoIpv4,
            Format::Vxlan => LeaseBackend::Vxlan(VxlanData {
                vni: self.spec.vni,
                vtep_mac: self.vtep_mac,
            }),
        };
        let attrs = LeaseAttrs::new(self.spec.public_ip, backend);
        // One overlay device carries both families: its MAC is our VtepMAC for IPv6 too.
        match self.public_ipv6 {
            Some(ip) => attrs.with_ipv6(
                ip,
                Some(VxlanData {
                    vni: self.spec.vni,
                    vtep_mac: self.vtep_mac,
                }),
            ),
            None => attrs,
        }
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    fn activate(&mut self, subnet: Ipv4Network, network: Ipv4Network) -> Result<(), BackendError> {
        if self.ipv6_only() {
            return Err(BackendError::Other(format!(
                "IPv4 subnet {subnet} given to a datapath started for an IPv6-only network"
            )));
        }
        // Only our address changed (the underlay renumbered): a map write, not a re-attach
        // (which costs about 130 ms of reloading).
        if let Some(dp) = self.datapath.as_mut()
            && self.spec.mtu.is_none_or(|mtu| mtu == dp.mtu())
            && dp.fits(subnet, network)
        {
            if dp.spec().public_ip != self.spec.public_ip {
                dp.set_public_ip(self.spec.public_ip)?;
            }
            return Ok(());
        }
        // Our lease was lost and taken again: the old datapath gives way first (pinned links
        // stay and are adopted), then the programs are loaded anew.
        drop(self.datapath.take());
        // The underlay may have been re-created or changed its MTU since: derive ours anew.
        if self.spec.mtu.is_none() {
            self.mtu = self.container_mtu(netdev::link_info(&self.spec.underlay)?.mtu);
        }
        let programs = match self.programs.take() {
            Some(p) => p,
            None => Programs::load_pinned(self.spec.pin_dir.as_deref())?,
        };
        let spec = DatapathSpec {
            mtu: Some(self.mtu),
            vtep_mac: Some(self.vtep_mac),
            ..self.spec.clone()
        };
        self.datapath = Some(Datapath::attach(programs, spec, subnet, network)?);
        Ok(())
    }

    fn set_public_ip(&mut self, public_ip: std::net::Ipv4Addr) -> Result<(), BackendError> {
        self.spec.public_ip = public_ip;
        Ok(())
    }

    fn activate_ipv6(&mut self, subnet: Ipv6Network, network: Ipv6Network) -> Result<(), BackendError> {
        let public_ip = self
            .public_ipv6
            .ok_or_else(|| BackendError::Unavailable("the eBPF datapath was started without a PublicIPv6".into()))?;
        if self.ipv6_only() {
            // No IPv4 activation came first: this one attaches, as `activate` does for IPv4.
            drop(self.datapath.take());
            self.mtu = self.container_mtu(netdev::link_info(&self.spec.underlay)?.mtu);
            let programs = match self.programs.take() {
                Some(p) => p,
                None => Programs::load_pinned(self.spec.pin_dir.as_deref())?,
            };
            let spec = DatapathSpec {
                mtu: Some(self.mtu),
                vtep_mac: Some(self.vtep_mac),
                ..self.spec.clone()
            };
            self.datapath = Some(Datapath::attach_ipv6_only(programs, spec, public_ip, subnet, network)?);
            return Ok(());
        }
        self.datapath()?.enable_ipv6(public_ip, subnet, network)?;
        Ok(())
    }

    fn set_peer(&mut self, peer: &Peer) -> Result<(), BackendError> {
        let dp = self.datapath()?;
        if dp.ipv4().is_some() {
            dp.upsert_peer(*peer)?;
        }
        // Peer::check gave a vxlan peer with an IPv6 side its v6 VtepMAC.
        if let (Some(v6), Some(_)) = (peer.ipv6, dp.ipv6()) {
            dp.upsert_peer6(ipv6::Peer6 {
                subnet: v6.subnet,
                public_ip: v6.public_ip,
                vtep_mac: v6.vtep_mac.unwrap_or_default(),
            })?;
        }
        Ok(())
    }

    fn remove_peer(&mut self, key: SubnetKey) -> Result<(), BackendError> {
        let dp = self.datapath()?;
        if dp.ipv4().is_some() {
            dp.remove_peer(key.ipv4)?;
        }
        if let (Some(v6), Some(_)) = (key.ipv6, dp.ipv6()) {
            dp.remove_peer6(v6)?;
        }
        Ok(())
    }

    fn peers(&self) -> Vec<SubnetKey> {
        match &self.datapath {
            // IPv6-only peers are keyed by their IPv6 subnet, as their leases are.
            Some(d) if d.ipv4().is_none() => d.peers6().map(|p| SubnetKey::ipv6_only(p.subnet)).collect(),
            Some(d) => d.peers().map(Peer::key).collect(),
            None => Vec::new(),
        }
    }

    fn tick(&mut self) {
        if let Some(dp) = self.datapath.as_mut() {
            dp.sync_bridge();
        }
    }

    fn counters(&mut self) -> Option<Counters> {
        self.datapath.as_mut().and_then(|d| d.counters().ok())
    }

    fn capabilities(&self) -> Option<serde_json::Value> {
        let mut caps = self.capabilities.clone();
        if let Some(d) = &self.datapath {
            caps.tc_attach = d.tc_mode();
            caps.native_xdp = d.native_xdp();
        }
        Some(caps.to_json())
    }

    fn describe(&self) -> String {
        let mode = match &self.datapath {
            Some(d) => d.decap_description(),
            None => "not attached".into(),
        };
        let kind = backend_kind(self.spec.format).name();
        let tc = match self.datapath.as_ref().and_then(|d| d.tc_mode()) {
            Some(attach::TcMode::Netlink) => ", tc via clsact",
            _ => "",
        };
        let routing = match &self.datapath {
            Some(d) => d.host_routing_description(),
            None => "not attached".into(),
        };
        let pinned = if self.spec.pin_dir.is_some() { "" } else { ", unpinned" };
        format!(
            "ebpf-{kind} (decap {mode}{tc}{pinned}, device {}, host routing {routing})",
            self.spec.overlay_device
        )
    }
}
