//! Our eBPF datapath as an agent backend, in either wire format.
use std::{net::Ipv4Addr, path::PathBuf};

use ipnetwork::Ipv4Network;
use serde_json::json;

use super::{Backend, BackendError, PeerLease};
use crate::{
    datapath::{
        Counters, Datapath, DatapathSpec, DecapAttach, DecapHook, Format, MacAddr, PeerEntry, Programs, XdpAttach,
        netdev,
    },
    subnet::LeaseAttrs,
};

pub struct EbpfOptions {
    pub underlay: String,
    pub public_ip: Ipv4Addr,
    pub format: Format,
    pub port: u16,
    pub vni: u32,
    /// 0: from the underlay MTU.
    pub mtu: u32,
    pub device: String,
    pub pin_dir: Option<PathBuf>,
    pub xdp: XdpAttach,
    pub decap: DecapAttach,
    pub bridge_redirect: bool,
}

pub struct EbpfBackend {
    opts: EbpfOptions,
    vtep_mac: MacAddr,
    mtu: u32,
    datapath: Option<Datapath>,
}

impl EbpfBackend {
    /// Check that the programs load here (so the agent can fall back before it leases), and
    /// create the overlay device, whose MAC our lease publishes.
    pub fn new(opts: EbpfOptions) -> Result<Self, BackendError> {
        Programs::load().map_err(|e| BackendError::Unavailable(format!("eBPF programs do not load: {e}")))?;
        let underlay = netdev::link_info(&opts.underlay)?;
        let device = netdev::create_overlay_device(&opts.device, None)?;
        let vtep_mac = device.mac.unwrap_or_default();
        let mtu = if opts.mtu > 0 {
            opts.mtu
        } else {
            underlay.mtu.saturating_sub(opts.format.overhead())
        };
        Ok(EbpfBackend {
            opts,
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
        match self.opts.format {
            // flannel's udp backend writes no BackendType.
            Format::Udp => LeaseAttrs::new(self.opts.public_ip, "", None),
            Format::Vxlan => LeaseAttrs::new(
                self.opts.public_ip,
                "vxlan",
                Some(json!({"VNI": self.opts.vni, "VtepMAC": self.vtep_mac.to_string()})),
            ),
        }
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    fn activate(&mut self, subnet: Ipv4Network, network: Ipv4Network) -> Result<(), BackendError> {
        let dp = Datapath::attach(DatapathSpec {
            underlay: self.opts.underlay.clone(),
            public_ip: self.opts.public_ip,
            subnet,
            network,
            format: self.opts.format,
            port: self.opts.port,
            vni: self.opts.vni,
            overlay_device: self.opts.device.clone(),
            mtu: Some(self.mtu),
            vtep_mac: Some(self.vtep_mac),
            xdp: self.opts.xdp,
            decap: self.opts.decap,
            pin_dir: self.opts.pin_dir.clone(),
            bridge_redirect: self.opts.bridge_redirect,
        })?;
        self.datapath = Some(dp);
        Ok(())
    }

    fn set_peer(&mut self, peer: &PeerLease) -> Result<(), BackendError> {
        let entry = PeerEntry {
            subnet: peer.subnet,
            public_ip: peer.public_ip,
            vtep_mac: peer.vtep_mac,
        };
        self.datapath()?.upsert_peer(entry)?;
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
            Some(d) if d.decap_adopted() => format!("{} adopted", d.decap_hook().name()),
            Some(d) => match (d.decap_hook(), d.xdp_mode()) {
                (DecapHook::Xdp, Some(m)) => format!("xdp {}", format!("{m:?}").to_lowercase()),
                (hook, _) => hook.name().into(),
            },
            None => "not attached".into(),
        };
        let format = match self.opts.format {
            Format::Udp => "udp",
            Format::Vxlan => "vxlan",
        };
        format!("ebpf-{format} (decap {mode}, device {})", self.opts.device)
    }

    fn expected_backend_type(&self) -> &'static str {
        match self.opts.format {
            Format::Udp => "udp",
            Format::Vxlan => "vxlan",
        }
    }
}
