//! The lab the end-to-end tests, the demo and the benchmarks run in: network namespaces as
//! hosts and containers, `overlay` processes in them, real traffic, a real etcd.

pub mod cluster;
pub mod lab;
pub mod netns;
pub mod traffic;

pub mod etcd;
pub mod vms;
