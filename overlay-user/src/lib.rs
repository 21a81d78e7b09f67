//! The node agent: leases this host's subnet in etcd the way flannel does, and drives the eBPF
//! datapath to match the set of leases.
//!
//! - [`datapath`]: load, attach and detach the eBPF programs; the peer table in BPF maps.
//! - [`subnet`]: network config, subnet leases and watches in etcd, the subnet file.
//! - [`agent`]: `overlay agent`, the flanneld replacement: lease, reconcile, health, rules.
//! - [`backend`]: how packets reach a peer: eBPF, kernel vxlan, TUN udp, host-gw.
//! - [`cli`]: the `overlay` command's subcommands.

pub mod agent;
pub mod backend;
pub mod cli;
pub mod datapath;
pub mod subnet;
