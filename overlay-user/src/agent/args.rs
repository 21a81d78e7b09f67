//! flanneld's flags, with its names and meanings, also from `FLANNELD_*` variables; plus ours.
use std::{net::Ipv4Addr, path::PathBuf};

use crate::{
    backend::ebpf::{DecapAttach, XdpAttach},
    subnet::etcd::EtcdArgs,
};

/// Which implementation carries the traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DatapathChoice {
    /// eBPF when it loads; otherwise the kernel's fallback for the backend, with the reason logged.
    #[default]
    Auto,
    /// eBPF only: fail if it cannot be loaded.
    Ebpf,
    /// What flannel itself uses: the kernel vxlan device, or a TUN device with a userspace
    /// forwarder for udp.
    Kernel,
}

#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// Interface (name or address) for inter-host traffic; repeatable, first match wins
    /// [default: the interface of the default route].
    #[arg(long = "iface", env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,
    /// Regex matched against interface names and addresses when --iface gives none.
    #[arg(long = "iface-regex", env = "FLANNELD_IFACE_REGEX", value_delimiter = ',')]
    pub iface_regex: Vec<String>,
    /// The address other hosts send tunnel traffic to [default: the interface's address].
    #[arg(long = "public-ip", env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// Where to write FLANNEL_NETWORK, FLANNEL_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ.
    #[arg(
        long = "subnet-file",
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// Minutes before the lease expires to renew it.
    #[arg(
        long = "subnet-lease-renew-margin",
        env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
        default_value_t = 60
    )]
    pub renew_margin_minutes: u64,
    /// Masquerade traffic leaving the overlay network.
    #[arg(long = "ip-masq", env = "FLANNELD_IP_MASQ", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub ip_masq: bool,
    /// Accept forwarded traffic of the network in FORWARD (Docker sets its policy to DROP).
    #[arg(long = "iptables-forward-rules", env = "FLANNELD_IPTABLES_FORWARD_RULES", num_args = 0..=1, default_missing_value = "true", default_value_t = true, action = clap::ArgAction::Set)]
    pub iptables_forward_rules: bool,
    /// Address for /healthz, /readyz, /metrics.
    #[arg(long = "healthz-ip", env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: Ipv4Addr,
    /// Port for /healthz, /readyz, /metrics; 0 disables them.
    #[arg(long = "healthz-port", env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,
    /// Log verbosity as flanneld's glog -v: 0 info, 1+ debug, 3+ trace. RUST_LOG overrides.
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,

    /// eBPF, or flannel's own kernel datapath.
    #[arg(long, env = "OVERLAY_DATAPATH", value_enum, default_value_t = DatapathChoice::Auto)]
    pub datapath: DatapathChoice,
    /// bpffs directory where the datapath is pinned, so a restart does not interrupt traffic.
    #[arg(long, env = "OVERLAY_PIN_DIR", default_value = "/sys/fs/bpf/overlay")]
    pub pin_dir: PathBuf,
    /// Overlay device of the eBPF datapath.
    #[arg(long, env = "OVERLAY_DEVICE", default_value = "ovl0")]
    pub overlay_device: String,
    /// XDP attach mode of the eBPF datapath.
    #[arg(long, value_enum, default_value_t = XdpAttach::Auto)]
    pub xdp_mode: XdpAttach,
    /// Hook that decapsulates on the underlay: auto = TC ingress on veth, XDP elsewhere.
    #[arg(long, env = "OVERLAY_DECAP", value_enum, default_value_t = DecapAttach::Auto)]
    pub decap: DecapAttach,
    /// With TC decapsulation: frames for a container leave the container bridge (docker0, cni0)
    /// straight to the container's port, keeping their offloads; the bridge's own forwarding
    /// would segment each decapsulated 64 KB packet in software. =false keeps the bridge's path.
    #[arg(long = "bridge-redirect", env = "OVERLAY_BRIDGE_REDIRECT", num_args = 0..=1, default_missing_value = "true", default_value_t = true, action = clap::ArgAction::Set)]
    pub bridge_redirect: bool,
    /// If our lease is deleted from etcd, lease again instead of stopping (flanneld stops).
    #[arg(long)]
    pub reacquire_lease: bool,
    /// Lease TTL in seconds (flannel: 24 h); short values are for tests.
    #[arg(long, default_value_t = 24 * 3600, hide = true)]
    pub lease_ttl_secs: u64,
    /// Remove everything the agent installed (datapath, devices, routes, iptables rules,
    /// subnet file) and exit. The lease stays in etcd until it expires.
    #[arg(long)]
    pub cleanup: bool,
}

/// flanneld and Go programs take long flags with one dash (`-etcd-endpoints=...`, as unit
/// files from the guides pass them). Rewrite those to clap's `--` form; `-v` stays short.
pub fn normalize_go_flags(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let is_go_long = i > 0
                && a.starts_with('-')
                && !a.starts_with("--")
                && a.len() > 2
                && a.as_bytes()[1].is_ascii_alphabetic()
                && !a.starts_with("-v=");
            if is_go_long { format!("-{a}") } else { a }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_flags_become_long_flags() {
        let args = [
            "overlay", "agent", "-etcd-endpoints=http://a:2379", "-iface", "eth1", "-v=2", "-v", "3", "--ip-masq",
            "-ip-masq",
        ]
        .map(String::from);
        let expected = [
            "overlay", "agent", "--etcd-endpoints=http://a:2379", "--iface", "eth1", "-v=2", "-v", "3", "--ip-masq",
            "--ip-masq",
        ];
        assert_eq!(normalize_go_flags(args), expected.map(String::from).to_vec());
    }
}
