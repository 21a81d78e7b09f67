//! Backends behind one small interface, as flannel's `pkg/backend`: how packets for a peer's
//! subnet get there. The agent leases, watches and reconciles; a backend programs the host.
//!
//! - [`ebpf`]: our eBPF datapath, vxlan or udp wire format (the default).
//! - [`kernel_vxlan`]: the kernel vxlan device as flannel programs it (fallback, baseline).
//! - [`tun_udp`] + [`userspace_udp`]: flannel's udp design, a TUN device and a userspace
//!   forwarder (fallback, baseline).
//! - [`host_gw`]: plain routes via each peer's PublicIP.

pub mod direct_routing;
pub mod ebpf;
pub mod host_gw;
pub mod kernel_vxlan;
pub mod tun_udp;
pub mod userspace_udp;

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::{
    datapath::{Counters, DatapathError, MacAddr},
    subnet::{Lease, LeaseAttrs},
};

/// Routing protocol number on the routes backends install, so `--cleanup` can find them
/// (`ip route show proto 73`).
pub const ROUTE_PROTO: &str = "73";

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("backend used before its subnet was known")]
    NotActive,
    #[error("peer {0}: {1}")]
    Peer(Ipv4Network, String),
    #[error("{0}")]
    Other(String),
}

/// What a backend needs of another host's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerLease {
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: Option<MacAddr>,
}

impl PeerLease {
    /// Read a peer from its lease, or say why it cannot be one for a backend of `backend_type`
    /// (flannel's backends likewise ignore leases of another type).
    pub fn from_lease(lease: &Lease, backend_type: &str) -> Result<Self, String> {
        let attrs = &lease.attrs;
        let lease_type = if attrs.backend_type.is_empty() {
            "udp"
        } else {
            attrs.backend_type.as_str()
        };
        if lease_type != backend_type {
            return Err(format!("its backend is {lease_type:?}, ours is {backend_type:?}"));
        }
        let vtep_mac = match (&attrs.backend_data, backend_type) {
            (Some(data), "vxlan") => {
                let mac = data
                    .get("VtepMAC")
                    .and_then(|m| m.as_str())
                    .ok_or("vxlan lease without BackendData.VtepMAC")?;
                Some(mac.parse::<MacAddr>()?)
            }
            (None, "vxlan") => return Err("vxlan lease without BackendData".into()),
            _ => None,
        };
        if attrs.public_ip.is_unspecified() {
            return Err("lease without PublicIP".into());
        }
        Ok(PeerLease {
            subnet: lease.subnet(),
            public_ip: attrs.public_ip,
            vtep_mac,
        })
    }
}

pub trait Backend: Send {
    /// What our lease publishes: PublicIP, BackendType, BackendData.
    fn lease_attrs(&self) -> LeaseAttrs;
    /// Container MTU, written to the subnet file as FLANNEL_MTU.
    fn mtu(&self) -> u32;
    /// Program this host once its subnet is leased.
    fn activate(&mut self, subnet: Ipv4Network, network: Ipv4Network) -> Result<(), BackendError>;
    /// Add or update a peer; repeating an unchanged peer is cheap and does nothing.
    fn set_peer(&mut self, peer: &PeerLease) -> Result<(), BackendError>;
    fn remove_peer(&mut self, subnet: Ipv4Network) -> Result<(), BackendError>;
    /// The peers as currently programmed.
    fn peers(&self) -> Vec<Ipv4Network>;
    /// Periodic upkeep (about once a second), for backends that follow local state.
    fn tick(&mut self) {}
    /// Datapath counters, where the backend has them.
    fn counters(&mut self) -> Option<Counters> {
        None
    }
    /// One line for logs and `overlay status`.
    fn describe(&self) -> String;
    /// The lease BackendType this backend can reach ("udp" for leases without one).
    fn expected_backend_type(&self) -> &'static str;
}
