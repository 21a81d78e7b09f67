//! Network config, subnet leases in etcd, the subnet file (flannel's pkg/subnet).
//!
//! The agent's path: [`etcd::EtcdRegistry::connect`] with [`etcd::EtcdArgs`], then
//! [`manager::LeaseManager::wait_for_config`], [`manager::LeaseManager::acquire`],
//! [`file::write_subnet_file`], and [`manager::LeaseManager::run`] for renewal and peer events.

pub mod config;
pub mod docker_opts;
pub mod etcd;
pub mod file;
pub mod lease;
pub mod manager;
#[cfg(test)]
pub mod mem;
pub mod registry;

pub use config::{Backend, ConfigError, NetworkConfig};
pub use lease::{BackendKind, Lease, LeaseAttrs, LeaseBackend, LeaseEvent, SubnetKey, VxlanData};
pub use manager::{LeaseManager, ManagerError, ManagerOptions};
pub use registry::Registry;
