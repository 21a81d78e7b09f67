//! The node agent: leases this host's subnet in etcd the way flannel does, and drives the eBPF
//! datapath to match the set of leases.
//!
//! - [`subnet`]: network config, subnet leases and watches in etcd, the subnet file.
//! - [`agent`]: `overlay agent`, the flanneld replacement: lease, reconcile, health, rules.
//! - [`backend`]: how packets reach a peer: [`backend::ebpf`] (our datapath: load, attach,
//!   pin, the peer table in BPF maps, the container bridge), kernel vxlan, TUN udp, host-gw.
//! - [`host`]: links, addresses, routes, sysctls, MACs and counters, for every backend.
//! - [`cli`]: the `overlay` command's subcommands.

pub mod agent;
pub mod backend;
pub mod cli;
pub mod host;
pub mod subnet;
