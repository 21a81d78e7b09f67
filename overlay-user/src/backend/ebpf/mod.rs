//! Our eBPF datapath, as an agent backend in either wire format and on its own
//! (`overlay datapath`).
//!
//! - [`programs`]: the object loaded into the kernel (verified, not attached), typed access to
//!   its maps. Loaded once per start.
//! - [`attach`]: the programs put on a host ([`Datapath`]): the overlay device whose egress
//!   encapsulates, XDP or TC ingress on the underlay that decapsulates, pinning and adoption.
//! - [`peers`]: the peer table in the maps.
//! - [`bridge`]: the container bridge followed, its forwarding database mirrored for the
//!   program on its egress.
pub mod attach;
pub mod bridge;
pub mod peers;
pub mod programs;

use std::collections::HashMap;

pub use attach::{DatapathSpec, DecapAttach, DecapHook, XdpAttach, choose_decap};
use aya::programs::XdpMode;
use ipnetwork::Ipv4Network;
pub use overlay_common::Format;
pub use programs::{DatapathError, Programs};

use super::{Backend, BackendError, Peer};
use crate::{
    host::{Counters, MacAddr, netdev},
    subnet::{BackendKind, LeaseAttrs, LeaseBackend, VxlanData},
};

/// The datapath attached to this host. Dropping it detaches everything it attached and removes
/// the device it created, unless it is pinned.
pub struct Datapath {
    programs: Programs,
    spec: DatapathSpec,
    /// This host's container subnet and the whole overlay network (routed to the overlay device).
    subnet: Ipv4Network,
    network: Ipv4Network,
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
    /// Loaded in [`EbpfBackend::new`], handed to the datapath on activation.
    programs: Option<Programs>,
    vtep_mac: MacAddr,
    mtu: u32,
    datapath: Option<Datapath>,
}

impl EbpfBackend {
    /// Load the programs (so the agent can fall back before it leases if this kernel refuses
    /// them) and create the overlay device, whose MAC our lease publishes.
    pub fn new(spec: DatapathSpec) -> Result<Self, BackendError> {
        let mut programs = Programs::load_pinned(spec.pin_dir.as_deref())
            .map_err(|e| BackendError::Unavailable(format!("eBPF programs do not load: {e}")))?;
        if spec.format == Format::Vxlan {
            let takes_flags = programs
                .probe_vxlan_encap()
                .map_err(|e| BackendError::Unavailable(format!("probing bpf_skb_adjust_room: {e}")))?;
            tracing::info!(
                encap_l2_eth = takes_flags,
                "probed bpf_skb_adjust_room's vxlan encap flags"
            );
            if !takes_flags {
                return Err(BackendError::Unavailable(
                    "this kernel's bpf_skb_adjust_room refuses BPF_F_ADJ_ROOM_ENCAP_L2_ETH (added in 5.13), \
                     which the eBPF vxlan encapsulation needs"
                        .into(),
                ));
            }
        }
        let underlay = netdev::link_info(&spec.underlay)?;
        let device = netdev::create_overlay_device(&spec.overlay_device, spec.vtep_mac)?;
        let vtep_mac = device.mac.unwrap_or_default();
        let mtu = spec.effective_mtu(underlay.mtu);
        Ok(EbpfBackend {
            spec,
            programs: Some(programs),
            vtep_mac,
            mtu,
            datapath: None,
        })
    }

    fn datapath(&mut self) -> Result<&mut Datapath, BackendError> {
        self.datapath.as_mut().ok_or(BackendError::NotActive)
    }
}

impl Backend for EbpfBackend {
    fn lease_attrs(&self) -> LeaseAttrs {
        let backend = match self.spec.format {
            Format::Udp => LeaseBackend::Udp,
            Format::Vxlan => LeaseBackend::Vxlan(VxlanData {
                vni: self.spec.vni,
                vtep_mac: self.vtep_mac,
            }),
        };
        LeaseAttrs::new(self.spec.public_ip, backend)
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    fn activate(&mut self, subnet: Ipv4Network, network: Ipv4Network) -> Result<(), BackendError> {
        // Our lease was lost and taken again: the old datapath gives way first (pinned links
        // stay and are adopted), then the programs are loaded anew.
        drop(self.datapath.take());
        // The underlay may have been re-created or changed its MTU since: derive ours anew.
        if self.spec.mtu.is_none() {
            self.mtu = self.spec.effective_mtu(netdev::link_info(&self.spec.underlay)?.mtu);
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

    fn set_peer(&mut self, peer: &Peer) -> Result<(), BackendError> {
        self.datapath()?.upsert_peer(*peer)?;
        Ok(())
    }

    fn remove_peer(&mut self, subnet: Ipv4Network) -> Result<(), BackendError> {
        self.datapath()?.remove_peer(subnet)?;
        Ok(())
    }

    fn peers(&self) -> Vec<Ipv4Network> {
        self.datapath
            .as_ref()
            .map(|d| d.peers().map(|p| p.subnet).collect())
            .unwrap_or_default()
    }

    fn tick(&mut self) {
        if let Some(dp) = self.datapath.as_mut() {
            dp.sync_bridge();
        }
    }

    fn counters(&mut self) -> Option<Counters> {
        self.datapath.as_mut().and_then(|d| d.counters().ok())
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
        let pinned = if self.spec.pin_dir.is_some() { "" } else { ", unpinned" };
        format!(
            "ebpf-{kind} (decap {mode}{tc}{pinned}, device {})",
            self.spec.overlay_device
        )
    }
}
