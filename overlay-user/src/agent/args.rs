//! flanneld's flags, with its names and meanings, also from `FLANNELD_*` variables; plus ours.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

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
    #[arg(long = "iface", value_delimiter = ',')]
    pub iface: Vec<String>,
    /// Regex matched against interface names and addresses when --iface finds none; repeatable.
    #[arg(long = "iface-regex")]
    pub iface_regex: Vec<String>,
    /// Pick the interface `ip route get <address>` would use, when --iface and --iface-regex find none.
    #[arg(long = "iface-can-reach")]
    pub iface_can_reach: Option<Ipv4Addr>,
    /// The address other hosts send tunnel traffic to [default: the interface's address].
    #[arg(long = "public-ip")]
    pub public_ip: Option<Ipv4Addr>,
    /// The IPv6 address other hosts send IPv6 tunnel traffic to, when the network has IPv6
    /// [default: the interface's best IPv6 address].
    #[arg(long = "public-ipv6")]
    pub public_ipv6: Option<Ipv6Addr>,
    /// Where to write FLANNEL_NETWORK, FLANNEL_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ.
    #[arg(long = "subnet-file", default_value = "/run/flannel/subnet.env")]
    pub subnet_file: PathBuf,
    /// Minutes before the lease expires to renew it (1 to 1439).
    #[arg(long = "subnet-lease-renew-margin", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..1440))]
    pub renew_margin_minutes: u64,
    /// Masquerade traffic leaving the overlay network.
    #[arg(long = "ip-masq", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub ip_masq: bool,
    /// Masquerade without --random-fully.
    #[arg(long = "ip-masq-fully-random-disable", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub ip_masq_fully_random_disable: bool,
    /// Seconds between checks that our iptables rules (and the blackhole route) are in place.
    #[arg(long = "iptables-resync", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub iptables_resync: u64,
    /// Accept forwarded traffic of the network in FORWARD (Docker sets its policy to DROP).
    #[arg(long = "iptables-forward-rules", num_args = 0..=1, default_missing_value = "true", default_value_t = true, action = clap::ArgAction::Set)]
    pub iptables_forward_rules: bool,
    /// Keep a blackhole route for our subnet, so traffic to unused addresses in it is dropped
    /// here (added only where no other route for the subnet exists, as flanneld does).
    #[arg(long = "ip-blackhole-route", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub ip_blackhole_route: bool,
    /// Address for /healthz, /readyz, /metrics.
    #[arg(long = "healthz-ip", default_value = "0.0.0.0")]
    pub healthz_ip: Ipv4Addr,
    /// Port for /healthz, /readyz, /metrics; 0 disables them.
    #[arg(long = "healthz-port", default_value_t = 0)]
    pub healthz_port: u16,
    /// Log verbosity as flanneld's glog -v: 0 info, 1+ debug, 3+ trace. RUST_LOG overrides.
    #[arg(long = "v", default_value_t = 0)]
    pub verbosity: u8,
    /// glog's per-file verbosity (`pattern=N,...`): checked, but Go file names mean nothing
    /// here; RUST_LOG=overlay::agent=debug does it per module.
    #[arg(long = "vmodule", value_parser = parse_vmodule)]
    pub vmodule: Option<String>,
    /// glog's `file.go:N` stack trace point: checked, no equivalent here.
    #[arg(long = "log_backtrace_at", value_parser = parse_backtrace_at)]
    pub log_backtrace_at: Option<String>,
    /// Print the version and exit.
    #[arg(long = "version", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub version: bool,

    /// flanneld's Kubernetes subnet manager: refused (leases live in etcd here).
    #[arg(long = "kube-subnet-mgr", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub kube_subnet_mgr: bool,
    /// Only with --kube-subnet-mgr (accepted and unused, as flanneld without it).
    #[arg(long = "kube-api-url", hide = true)]
    pub kube_api_url: Option<String>,
    /// Only with --kube-subnet-mgr (accepted and unused, as flanneld without it).
    #[arg(
        long = "kube-annotation-prefix",
        default_value = "flannel.alpha.coreos.com",
        hide = true
    )]
    pub kube_annotation_prefix: String,
    /// Only with --kube-subnet-mgr (accepted and unused, as flanneld without it).
    #[arg(long = "kubeconfig-file", hide = true)]
    pub kubeconfig_file: Option<String>,
    /// Only with --kube-subnet-mgr (accepted and unused, as flanneld without it).
    #[arg(
        long = "net-config-path",
        default_value = "/etc/kube-flannel/net-conf.json",
        hide = true
    )]
    pub net_config_path: PathBuf,
    /// Only with --kube-subnet-mgr (accepted and unused, as flanneld without it).
    #[arg(long = "set-node-network-unavailable", num_args = 0..=1, default_missing_value = "true", default_value_t = true, action = clap::ArgAction::Set, hide = true)]
    pub set_node_network_unavailable: bool,

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
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub reacquire_lease: bool,
    /// Lease TTL in seconds (flannel: 24 h); short values are for tests.
    #[arg(long, default_value_t = 24 * 3600, hide = true)]
    pub lease_ttl_secs: u64,
    /// Remove everything the agent installed (datapath, devices, routes, iptables rules,
    /// subnet file) and exit. The lease stays in etcd until it expires.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub cleanup: bool,
}

impl AgentArgs {
    /// Refuse what we do not do, saying why; note flags accepted for flanneld's sake only.
    pub fn check(&self) -> Result<(), String> {
        if self.kube_subnet_mgr {
            return Err(
                "--kube-subnet-mgr: this agent keeps leases in etcd, as flanneld does without that flag; \
                 flannel's Kubernetes subnet manager (node annotations through the API server) is not \
                 implemented. Drop the flag and give --etcd-endpoints, or run flanneld on Kubernetes"
                    .into(),
            );
        }
        if self.vmodule.as_deref().is_some_and(|v| !v.is_empty()) {
            tracing::warn!(
                "-vmodule names Go source files: no equivalent here, use RUST_LOG (e.g. overlay::agent=debug)"
            );
        }
        Ok(())
    }
}

/// glog's `-vmodule`: comma-separated `pattern=N`.
fn parse_vmodule(s: &str) -> Result<String, String> {
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let ok = part
            .split_once('=')
            .is_some_and(|(pattern, level)| !pattern.is_empty() && level.parse::<i32>().is_ok());
        if !ok {
            return Err(format!("{part:?}: expected a comma-separated list of pattern=N"));
        }
    }
    Ok(s.to_string())
}

/// glog's `-log_backtrace_at`: `file.go:N`.
fn parse_backtrace_at(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    match s.rsplit_once(':') {
        Some((file, line)) if !file.is_empty() && line.parse::<u32>().is_ok() => Ok(s.to_string()),
        _ => Err(format!("{s:?}: expected file.go:N")),
    }
}

/// How Go's `flag` package reads a flag's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoKind {
    /// `-x`, `-x=true|false|1|0|t|f|...`; never the next argument.
    Bool,
    /// `-x=N` or `-x N`, Go integer syntax (`0x1f`, `017`, `-3`).
    Int,
    /// glog's `-v`: a decimal int32.
    Level,
    /// `-x=s` or `-x s`; an empty value means "not set" (the default is empty).
    Text,
    /// `-x=s` or `-x s`, with a non-empty default that an empty value overrides.
    TextWithDefault,
}

/// Every flag flanneld v0.28.9 defines (main.go, and the three it copies from klog), in its order.
pub const FLANNELD_FLAGS: &[(&str, GoKind)] = &[
    ("etcd-endpoints", GoKind::TextWithDefault),
    ("etcd-prefix", GoKind::TextWithDefault),
    ("etcd-keyfile", GoKind::Text),
    ("etcd-certfile", GoKind::Text),
    ("etcd-cafile", GoKind::Text),
    ("etcd-username", GoKind::Text),
    ("etcd-password", GoKind::Text),
    ("iface", GoKind::Text),
    ("iface-regex", GoKind::Text),
    ("iface-can-reach", GoKind::Text),
    ("subnet-file", GoKind::TextWithDefault),
    ("public-ip", GoKind::Text),
    ("public-ipv6", GoKind::Text),
    ("subnet-lease-renew-margin", GoKind::Int),
    ("ip-masq", GoKind::Bool),
    ("ip-masq-fully-random-disable", GoKind::Bool),
    ("kube-subnet-mgr", GoKind::Bool),
    ("kube-api-url", GoKind::Text),
    ("kube-annotation-prefix", GoKind::TextWithDefault),
    ("kubeconfig-file", GoKind::Text),
    ("version", GoKind::Bool),
    ("healthz-ip", GoKind::TextWithDefault),
    ("healthz-port", GoKind::Int),
    ("iptables-resync", GoKind::Int),
    ("iptables-forward-rules", GoKind::Bool),
    ("ip-blackhole-route", GoKind::Bool),
    ("net-config-path", GoKind::TextWithDefault),
    ("set-node-network-unavailable", GoKind::Bool),
    ("v", GoKind::Level),
    ("vmodule", GoKind::Text),
    ("log_backtrace_at", GoKind::Text),
];

/// Our own flags, read with the same rules.
const OUR_FLAGS: &[(&str, GoKind)] = &[
    ("datapath", GoKind::Text),
    ("pin-dir", GoKind::Text),
    ("overlay-device", GoKind::Text),
    ("xdp-mode", GoKind::Text),
    ("decap", GoKind::Text),
    ("bridge-redirect", GoKind::Bool),
    ("reacquire-lease", GoKind::Bool),
    ("lease-ttl-secs", GoKind::Int),
    ("cleanup", GoKind::Bool),
];

fn kind_of(name: &str) -> Option<GoKind> {
    FLANNELD_FLAGS
        .iter()
        .chain(OUR_FLAGS)
        .find(|(n, _)| *n == name)
        .map(|(_, k)| *k)
}

/// `strconv.ParseBool`, which Go's boolean flags use.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// `strconv.ParseInt(s, 0, 64)`, which Go's int flags use: decimal, `0x`/`0o`/`0b` prefixes, a
/// leading `0` for octal, underscores between digits with a prefix.
pub fn parse_go_int(s: &str) -> Option<i64> {
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = digits.to_ascii_lowercase();
    // After a base prefix (or octal's leading 0) one underscore may come first: `0x_1f`.
    let (radix, body) = if let Some(b) = lower.strip_prefix("0x") {
        (16, b.strip_prefix('_').unwrap_or(b))
    } else if let Some(b) = lower.strip_prefix("0b") {
        (2, b.strip_prefix('_').unwrap_or(b))
    } else if let Some(b) = lower.strip_prefix("0o") {
        (8, b.strip_prefix('_').unwrap_or(b))
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, lower[1..].strip_prefix('_').unwrap_or(&lower[1..]))
    } else {
        (10, lower.as_str())
    };
    if body.is_empty() || body.starts_with('_') || body.ends_with('_') || body.contains("__") {
        return None;
    }
    if !body.chars().all(|c| c == '_' || c.is_digit(radix)) {
        return None;
    }
    let magnitude = i128::from_str_radix(&body.replace('_', ""), radix).ok()?;
    let value = if negative { -magnitude } else { magnitude };
    i64::try_from(value).ok()
}

/// A flag or variable that Go's `flag` rules (or flanneld's) refuse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GoFlagError {
    #[error(
        "-{flag}: invalid boolean {value:?} (Go's flag rules take 1, 0, t, f, true, false, TRUE, FALSE, True, False)"
    )]
    Bool { flag: String, value: String },
    #[error("-{flag}: invalid integer {value:?}")]
    Int { flag: String, value: String },
    #[error("-{flag} needs a value (-{flag}=VALUE or -{flag} VALUE)")]
    MissingValue { flag: String },
    #[error("bad flag syntax: {0:?}")]
    Syntax(String),
    #[error(
        "unexpected argument {arg:?}{after}: flags are -name=value or -name value, and a boolean \
         takes its value only as -name=value (flanneld would silently stop reading flags here)"
    )]
    Positional { arg: String, after: String },
    #[error("{variable}={value:?}: {reason}")]
    Variable {
        variable: String,
        value: String,
        reason: String,
    },
}

/// The environment variable flanneld reads for a flag (`FLANNELD_` + upper case, `-` as `_`).
pub fn env_name(flag: &str) -> String {
    format!("FLANNELD_{}", flag.to_ascii_uppercase().replace('-', "_"))
}

/// One flag's value in the `--name=value` form clap reads, or None to leave it unset.
fn clap_value(name: &str, kind: GoKind, value: &str) -> Result<Option<String>, GoFlagError> {
    let out = match kind {
        GoKind::Bool => parse_go_bool(value)
            .ok_or_else(|| GoFlagError::Bool {
                flag: name.into(),
                value: value.into(),
            })?
            .to_string(),
        GoKind::Int => parse_go_int(value)
            .ok_or_else(|| GoFlagError::Int {
                flag: name.into(),
                value: value.into(),
            })?
            .to_string(),
        // klog: a decimal int32; below 0 logs as 0 does.
        GoKind::Level => value
            .parse::<i32>()
            .map_err(|_| GoFlagError::Int {
                flag: name.into(),
                value: value.into(),
            })?
            .clamp(0, i32::from(u8::MAX))
            .to_string(),
        GoKind::Text if value.is_empty() => return Ok(None),
        GoKind::Text | GoKind::TextWithDefault => value.to_string(),
    };
    Ok(Some(format!("--{name}={out}")))
}

/// Read `overlay agent`'s arguments (after `agent`) with Go's `flag` rules, then add the
/// `FLANNELD_*` variables of flags not given, as flanneld's `SetFlagsFromEnv` does (empty
/// values count as unset). The result is in the `--name=value` form clap reads.
pub fn go_agent_args(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<String>, GoFlagError> {
    let mut out = Vec::new();
    let mut given = std::collections::HashSet::new();
    let mut previous_bool: Option<String> = None;
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            if let Some(extra) = args.get(i) {
                return Err(GoFlagError::Positional {
                    arg: extra.clone(),
                    after: " after --".into(),
                });
            }
            break;
        }
        let Some(body) = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .filter(|b| !b.is_empty())
        else {
            let after = previous_bool
                .map(|f| format!(" after the boolean -{f}"))
                .unwrap_or_default();
            return Err(GoFlagError::Positional {
                arg: arg.clone(),
                after,
            });
        };
        if body.starts_with('-') || body.starts_with('=') {
            return Err(GoFlagError::Syntax(arg.clone()));
        }
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        previous_bool = None;
        if matches!(name, "h" | "help") && inline.is_none() {
            out.push("--help".to_string());
            continue;
        }
        let Some(kind) = kind_of(name) else {
            // Unknown: clap names it and suggests the nearest flag.
            out.push(format!("--{body}"));
            continue;
        };
        given.insert(name.to_string());
        let value = match (kind, inline) {
            (_, Some(v)) => v.to_string(),
            (GoKind::Bool, None) => {
                previous_bool = Some(name.to_string());
                "true".to_string()
            }
            (_, None) => {
                let v = args
                    .get(i)
                    .ok_or_else(|| GoFlagError::MissingValue { flag: name.into() })?;
                i += 1;
                v.clone()
            }
        };
        let flag = clap_value(name, kind, &value)?;
        // Go keeps the last value of a repeated flag (an empty one unsets); --iface and
        // --iface-regex accumulate.
        if !matches!(name, "iface" | "iface-regex") {
            let prefix = format!("--{name}=");
            out.retain(|earlier: &String| !earlier.starts_with(&prefix));
        }
        out.extend(flag);
    }
    for (name, kind) in FLANNELD_FLAGS {
        // flanneld reads -version before the environment: FLANNELD_VERSION does nothing.
        if given.contains(*name) || *name == "version" {
            continue;
        }
        let variable = env_name(name);
        let Some(value) = env(&variable).filter(|v| !v.is_empty()) else {
            continue;
        };
        let flag = clap_value(name, *kind, &value).map_err(|e| GoFlagError::Variable {
            variable: variable.clone(),
            value: value.clone(),
            reason: e.to_string(),
        })?;
        out.extend(flag);
    }
    Ok(out)
}

/// flanneld and Go programs take long flags with one dash (`-etcd-endpoints=...`, as unit
/// files from the guides pass them). `overlay agent` reads its arguments with Go's `flag`
/// rules and the `FLANNELD_*` variables (see [`go_agent_args`]); a refused one ends the
/// process with exit code 2, as Go's flag errors do. Other subcommands get one-dash long
/// flags rewritten to clap's `--` form.
///
/// Must run before any thread starts: it removes empty `FLANNELD_*` variables from the
/// environment (flanneld treats them as unset; clap would read them as empty values).
pub fn normalize_go_flags(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let args: Vec<String> = args.into_iter().collect();
    if args.get(1).map(String::as_str) == Some("agent") {
        for (name, _) in FLANNELD_FLAGS {
            let variable = env_name(name);
            if std::env::var_os(&variable).is_some_and(|v| v.is_empty()) {
                // SAFETY: called first thing in main, before any other thread exists.
                unsafe { std::env::remove_var(&variable) };
            }
        }
        return match go_agent_args(&args[2..], &|k| std::env::var(k).ok()) {
            Ok(rest) => args[..2].iter().cloned().chain(rest).collect(),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        };
    }
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
    use std::collections::HashMap;

    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Agent {
        #[command(flatten)]
        args: AgentArgs,
    }

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<AgentArgs, String> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let rest = go_agent_args(&args, &|k| env.get(k).cloned()).map_err(|e| e.to_string())?;
        Agent::try_parse_from(std::iter::once("agent".to_string()).chain(rest))
            .map(|a| a.args)
            .map_err(|e| e.to_string())
    }

    /// A value flanneld accepts for each of its flags, and what it must set here.
    fn sample(name: &str) -> (&'static str, fn(&AgentArgs) -> bool) {
        match name {
            "etcd-endpoints" => ("http://10.0.0.1:2379,http://10.0.0.2:2379", |a| {
                a.etcd.endpoints.len() == 2
            }),
            "etcd-prefix" => ("/my/net", |a| a.etcd.prefix == "/my/net"),
            "etcd-keyfile" => ("/k.pem", |a| a.etcd.keyfile.as_deref() == Some(Path::new("/k.pem"))),
            "etcd-certfile" => ("/c.pem", |a| a.etcd.certfile.as_deref() == Some(Path::new("/c.pem"))),
            "etcd-cafile" => ("/ca.pem", |a| a.etcd.cafile.as_deref() == Some(Path::new("/ca.pem"))),
            "etcd-username" => ("u", |a| a.etcd.username.as_deref() == Some("u")),
            "etcd-password" => ("p", |a| a.etcd.password.as_deref() == Some("p")),
            "iface" => ("eth1", |a| a.iface == ["eth1"]),
            "iface-regex" => ("^en[a-z]{1,3}[0-9]$", |a| a.iface_regex == ["^en[a-z]{1,3}[0-9]$"]),
            "iface-can-reach" => ("10.9.8.7", |a| a.iface_can_reach == Some(Ipv4Addr::new(10, 9, 8, 7))),
            "subnet-file" => ("/tmp/s.env", |a| a.subnet_file == Path::new("/tmp/s.env")),
            "public-ip" => ("192.0.2.7", |a| a.public_ip == Some(Ipv4Addr::new(192, 0, 2, 7))),
            "public-ipv6" => ("2001:db8::7", |a| a.public_ipv6 == Some("2001:db8::7".parse().unwrap())),
            "subnet-lease-renew-margin" => ("0x1e", |a| a.renew_margin_minutes == 30),
            "ip-masq" => ("t", |a| a.ip_masq),
            "ip-masq-fully-random-disable" => ("TRUE", |a| a.ip_masq_fully_random_disable),
            "kube-subnet-mgr" => ("false", |a| !a.kube_subnet_mgr),
            "kube-api-url" => ("https://k:6443", |a| {
                a.kube_api_url.as_deref() == Some("https://k:6443")
            }),
            "kube-annotation-prefix" => ("x.io", |a| a.kube_annotation_prefix == "x.io"),
            "kubeconfig-file" => ("/kc", |a| a.kubeconfig_file.as_deref() == Some("/kc")),
            "version" => ("True", |a| a.version),
            "healthz-ip" => ("127.0.0.1", |a| a.healthz_ip == Ipv4Addr::LOCALHOST),
            "healthz-port" => ("8285", |a| a.healthz_port == 8285),
            "iptables-resync" => ("017", |a| a.iptables_resync == 15),
            "iptables-forward-rules" => ("0", |a| !a.iptables_forward_rules),
            "ip-blackhole-route" => ("1", |a| a.ip_blackhole_route),
            "net-config-path" => ("/n.json", |a| a.net_config_path == Path::new("/n.json")),
            "set-node-network-unavailable" => ("F", |a| !a.set_node_network_unavailable),
            "v" => ("2", |a| a.verbosity == 2),
            "vmodule" => ("main=3,vxlan*=4", |a| a.vmodule.as_deref() == Some("main=3,vxlan*=4")),
            "log_backtrace_at" => ("main.go:120", |a| a.log_backtrace_at.as_deref() == Some("main.go:120")),
            other => panic!("flanneld flag {other} has no sample: add one"),
        }
    }

    use std::path::Path;

    #[test]
    fn every_flanneld_flag_in_every_go_form_and_as_a_variable() {
        assert_eq!(FLANNELD_FLAGS.len(), 31, "flanneld v0.28.9 defines 31 flags");
        for (name, kind) in FLANNELD_FLAGS {
            let (value, holds) = sample(name);
            let mut forms: Vec<Vec<String>> = vec![vec![format!("-{name}={value}")], vec![format!("--{name}={value}")]];
            if *kind != GoKind::Bool {
                forms.push(vec![format!("-{name}"), value.to_string()]);
                forms.push(vec![format!("--{name}"), value.to_string()]);
            }
            for form in forms {
                let form: Vec<&str> = form.iter().map(String::as_str).collect();
                let a = parse(&form, &[]).unwrap_or_else(|e| panic!("{form:?}: {e}"));
                assert!(holds(&a), "{form:?} did not take effect: {a:?}");
            }
            if *name != "version" {
                let a = parse(&[], &[(&env_name(name), value)]).unwrap_or_else(|e| panic!("{}: {e}", env_name(name)));
                assert!(holds(&a), "{}={value} did not take effect", env_name(name));
            }
        }
    }

    #[test]
    fn go_booleans() {
        for (value, expected) in [
            ("1", true),
            ("t", true),
            ("T", true),
            ("true", true),
            ("TRUE", true),
            ("True", true),
            ("0", false),
            ("f", false),
            ("F", false),
            ("false", false),
            ("FALSE", false),
            ("False", false),
        ] {
            let a = parse(&[&format!("-ip-masq={value}")], &[]).unwrap();
            assert_eq!(a.ip_masq, expected, "-ip-masq={value}");
            let a = parse(&[], &[("FLANNELD_IP_MASQ", value)]).unwrap();
            assert_eq!(a.ip_masq, expected, "FLANNELD_IP_MASQ={value}");
        }
        assert!(parse(&["-ip-masq"], &[]).unwrap().ip_masq);
        assert!(parse(&["--ip-masq"], &[]).unwrap().ip_masq);
        let e = parse(&["-ip-masq=yes"], &[]).unwrap_err();
        assert!(e.contains("-ip-masq") && e.contains("\"yes\""), "{e}");
        // A Go boolean never takes the next argument: flanneld would stop reading flags there.
        let e = parse(&["-ip-masq", "true", "-iface=eth0"], &[]).unwrap_err();
        assert!(
            e.contains("\"true\"") && e.contains("after the boolean -ip-masq"),
            "{e}"
        );
        let a = parse(&["-ip-masq", "-iface", "eth0"], &[]).unwrap();
        assert!(a.ip_masq && a.iface == ["eth0"]);
        let e = parse(&[], &[("FLANNELD_IPTABLES_FORWARD_RULES", "nope")]).unwrap_err();
        assert!(e.contains("FLANNELD_IPTABLES_FORWARD_RULES"), "{e}");
    }

    #[test]
    fn values_and_variables_as_go_and_flanneld_read_them() {
        // A value flag takes the next argument whatever it looks like.
        let a = parse(&["-etcd-prefix", "-odd"], &[]).unwrap();
        assert_eq!(a.etcd.prefix, "-odd");
        // The command line wins over the environment; empty variables are unset.
        let a = parse(
            &["-iface=eth9"],
            &[
                ("FLANNELD_IFACE", "eth1"),
                ("FLANNELD_PUBLIC_IP", ""),
                ("FLANNELD_IP_MASQ", ""),
            ],
        )
        .unwrap();
        assert_eq!(a.iface, ["eth9"]);
        assert_eq!(a.public_ip, None);
        assert!(!a.ip_masq);
        // An empty string flag is "not set", as its Go default is "".
        let a = parse(
            &[
                "-public-ip=", "-etcd-cafile=", "-iface-can-reach=10.1.1.1", "-iface-can-reach=",
            ],
            &[],
        )
        .unwrap();
        assert_eq!((a.public_ip, a.etcd.cafile, a.iface_can_reach), (None, None, None));
        // Repeated: last wins; --iface and --iface-regex accumulate.
        let a = parse(
            &[
                "-v=1", "-v", "3", "-iface=a", "-iface", "b", "-iface-regex=x,y", "-iface-regex=z",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(a.verbosity, 3);
        assert_eq!(a.iface, ["a", "b"]);
        assert_eq!(a.iface_regex, ["x,y", "z"], "a regex may hold commas");
        assert_eq!(parse(&["-v=-2"], &[]).unwrap().verbosity, 0);
        for bad in [
            vec!["-healthz-port=eighty"],
            vec!["-iptables-resync"],
            vec!["---iface=eth0"],
            vec!["-=x"],
            vec!["stray"],
            vec!["--", "stray"],
            vec!["-subnet-lease-renew-margin=1440"],
            vec!["-subnet-lease-renew-margin=0"],
            vec!["-vmodule=main"],
            vec!["-log_backtrace_at=main.go"],
            vec!["-no-such-flag"],
        ] {
            assert!(parse(&bad, &[]).is_err(), "{bad:?} accepted");
        }
        let e = parse(&["-healthz-port=eighty"], &[]).unwrap_err();
        assert!(e.contains("healthz-port") && e.contains("eighty"), "{e}");
    }

    #[test]
    fn go_integers() {
        for (s, v) in [
            ("10", 10),
            ("0x1F", 31),
            ("017", 15),
            ("0o17", 15),
            ("0b101", 5),
            ("-3", -3),
            ("+4", 4),
            ("0", 0),
            ("1_0", 10),
            ("0x_1_f", 31),
            ("0_17", 15),
        ] {
            assert_eq!(parse_go_int(s), Some(v), "{s}");
        }
        for s in ["09", "", "_1", "1_", "1__0", "0x", "-", "ten"] {
            assert_eq!(parse_go_int(s), None, "{s}");
        }
    }

    #[test]
    fn kubernetes_is_refused_with_the_reason() {
        let a = parse(&["-kube-subnet-mgr"], &[]).unwrap();
        let e = a.check().unwrap_err();
        assert!(e.contains("--kube-subnet-mgr") && e.contains("Kubernetes"), "{e}");
        assert!(parse(&["-kube-subnet-mgr=false"], &[]).unwrap().check().is_ok());
    }

    #[test]
    fn our_booleans_follow_the_same_rules() {
        let a = parse(
            &[
                "-cleanup", "-bridge-redirect=0", "--reacquire-lease=t", "-pin-dir", "/x",
            ],
            &[],
        )
        .unwrap();
        assert!(a.cleanup && !a.bridge_redirect && a.reacquire_lease);
        assert_eq!(a.pin_dir, Path::new("/x"));
    }
}
