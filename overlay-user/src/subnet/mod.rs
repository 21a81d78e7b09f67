//! Network config, subnet leases in etcd, the subnet file (flannel's pkg/subnet).
