//! The few kernel settings the datapath needs besides its programs: the overlay device, its
//! address and route, and sysctls. Done through iproute2, whose messages users already know;
//! every failure names the command and what the kernel said.
use std::{net::Ipv4Addr, process::Command};

use ipnetwork::Ipv4Network;
use serde::Deserialize;

use super::{HostError, MacAddr};

#[derive(Debug, Clone)]
pub struct LinkInfo {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
    pub mac: Option<MacAddr>,
    /// Driver kind of a virtual device (`veth`, `bridge`, `dummy`...); None for hardware NICs.
    pub kind: Option<String>,
    /// A bridge that filters VLANs (`vlan_filtering 1`).
    pub vlan_filtering: bool,
}

impl LinkInfo {
    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }
}

#[derive(Deserialize)]
struct IpLink {
    ifname: String,
    ifindex: u32,
    mtu: u32,
    address: Option<String>,
    linkinfo: Option<IpLinkKind>,
}

#[derive(Deserialize)]
struct IpLinkKind {
    info_kind: Option<String>,
    info_data: Option<IpLinkData>,
}

#[derive(Deserialize)]
struct IpLinkData {
    vlan_filtering: Option<u8>,
}

pub fn ip(args: &[&str]) -> Result<String, HostError> {
    iproute2("ip", args)
}

/// Run `bridge <args>` (fdb entries for the kernel vxlan backend).
pub fn bridge(args: &[&str]) -> Result<String, HostError> {
    iproute2("bridge", args)
}

/// Run `ss <args>` (our sockets on an address the underlay lost).
pub fn ss(args: &[&str]) -> Result<String, HostError> {
    iproute2("ss", args)
}

/// Run one of iproute2's tools; a failure names the command line and what it said.
fn iproute2(program: &str, args: &[&str]) -> Result<String, HostError> {
    let command = || format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| HostError::Command {
            command: command(),
            message: format!("cannot run {program} (install iproute2): {e}"),
        })?;
    if !out.status.success() {
        return Err(HostError::Command {
            command: command(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn link_info(name: &str) -> Result<LinkInfo, HostError> {
    // -d for linkinfo: the driver kind tells a veth apart even where /sys is not this
    // namespace's (`ip netns exec` mounts a fresh one).
    let out = ip(&["-d", "-j", "link", "show", "dev", name]).map_err(|e| HostError::Interface {
        name: name.to_string(),
        reason: e.to_string(),
    })?;
    let links: Vec<IpLink> = serde_json::from_str(&out).map_err(|e| HostError::Interface {
        name: name.to_string(),
        reason: format!("unreadable `ip -j link` output: {e}"),
    })?;
    let l = links.into_iter().next().ok_or_else(|| HostError::Interface {
        name: name.to_string(),
        reason: "no such interface".into(),
    })?;
    Ok(LinkInfo {
        name: l.ifname,
        ifindex: l.ifindex,
        mtu: l.mtu,
        mac: l.address.and_then(|a| a.parse().ok()),
        vlan_filtering: l
            .linkinfo
            .as_ref()
            .and_then(|k| k.info_data.as_ref())
            .and_then(|d| d.vlan_filtering)
            .is_some_and(|v| v != 0),
        kind: l.linkinfo.and_then(|k| k.info_kind),
    })
}

/// The names of every link in this namespace.
pub fn link_names() -> Result<Vec<String>, HostError> {
    let out = ip(&["-j", "link", "show"])?;
    let links: Vec<serde_json::Value> = serde_json::from_str(&out).map_err(|e| HostError::Interface {
        name: "*".into(),
        reason: format!("unreadable `ip -j link` output: {e}"),
    })?;
    Ok(links
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(String::from))
        .collect())
}

pub fn link_exists(name: &str) -> bool {
    link_info(name).is_ok()
}

/// Create (or keep) the device that overlay traffic is routed to; our TC program on its egress
/// does the rest. Any Ethernet-type device that transmits nothing by itself will do: `dummy`,
/// or `ifb` on kernels built without dummy. Kept across restarts so its MAC, our VtepMAC, stays
/// the same; created before the lease, since the lease publishes that MAC.
pub fn create_overlay_device(name: &str, mac: Option<MacAddr>) -> Result<LinkInfo, HostError> {
    if let Ok(existing) = link_info(name) {
        // ifb cannot change its MAC once created: recreate it when another one is asked for.
        if mac.is_none() || existing.mac == mac {
            return Ok(existing);
        }
        delete_link(name)?;
    }
    let mac = mac.map(|m| m.to_string());
    let kind = ["dummy", "ifb"]
        .into_iter()
        .find(|kind| {
            let mut args = vec!["link", "add", name];
            if let Some(mac) = &mac {
                args.extend(["address", mac.as_str()]);
            }
            args.extend(["type", kind]);
            ip(&args).is_ok()
        })
        .ok_or_else(|| HostError::Interface {
            name: name.to_string(),
            reason: "cannot create the overlay device: this kernel has neither the dummy nor the ifb driver".into(),
        })?;
    tracing::info!(device = name, kind, "created overlay device");
    link_info(name)
}

/// MTU, address and state of the overlay device.
/// `addr`: the IPv4 /32 the device holds; None in an IPv6-only network, where any IPv4
/// address a previous (dual-stack) run left goes.
pub fn configure_overlay_device(name: &str, mtu: u32, addr: Option<Ipv4Addr>) -> Result<LinkInfo, HostError> {
    // No neighbour resolution on this device: every packet goes to our program, which resolves
    // the outer next hop itself.
    ip(&["link", "set", "dev", name, "arp", "off"])?;
    // No IPv6 on the overlay device until IPv6 is enabled on it: it would only emit neighbour
    // discovery we drop. An IPv6-only network enables it right after; turning it off first
    // would drop a restarted run's IPv6 address and route, a gap in all its traffic.
    match addr {
        Some(_) => drop(sysctl_set(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1")),
        // No link-local address, router solicitation or DAD when it comes up.
        None => drop(ip(&["link", "set", "dev", name, "addrgenmode", "none"])?),
    }
    ip(&["link", "set", "dev", name, "mtu", &mtu.to_string(), "up"])?;
    match addr {
        Some(addr) => ip(&["addr", "replace", &format!("{addr}/32"), "dev", name])?,
        None => ip(&["-4", "addr", "flush", "dev", name])?,
    };
    link_info(name)
}

/// Where systemd (and Cilium) mount the bpffs.
const SYSTEM_BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &std::path::Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

fn mount_bpffs(at: &std::path::Path) -> Result<(), HostError> {
    nix::mount::mount(Some("bpf"), at, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| HostError::Setup(format!("mounting a bpffs at {}: {e}", at.display())))?;
    tracing::info!(dir = %at.display(), "mounted a bpffs for pinned maps and links");
    // Outside the init mount namespace (`ip netns exec`, a unit with private mounts) the
    // mount, and with it every pin, goes when the last process in that namespace exits.
    let own = std::fs::read_link("/proc/self/ns/mnt").ok();
    if own.is_some() && own != std::fs::read_link("/proc/1/ns/mnt").ok() {
        tracing::warn!(
            dir = %at.display(),
            "this bpffs lives in a private mount namespace (`ip netns exec`?): the pinned datapath goes \
             with it when the agent exits, so the next start loads it afresh; mount a bpffs that outlives \
             the agent, or keep the mount namespace, for restarts without a gap"
        );
    }
    Ok(())
}

/// Make sure `dir` exists on a bpffs: pins live only there. A pin directory under an
/// unmounted /sys/fs/bpf gets a bpffs mounted at /sys/fs/bpf, as systemd does at boot (plain
/// sysfs refuses mkdir, and `ip netns exec` gives a fresh /sys without it); any other directory
/// gets one mounted on itself.
pub fn ensure_bpffs(dir: &std::path::Path) -> Result<(), HostError> {
    let system = std::path::Path::new(SYSTEM_BPFFS);
    if dir.starts_with(system) && !is_bpffs(system) {
        if !system.is_dir() {
            return Err(HostError::Setup(format!(
                "pin directory {} lies under {SYSTEM_BPFFS}, which does not exist here (is /sys mounted? \
                 is the kernel built with BPF?): pass --pin-dir on a bpffs",
                dir.display()
            )));
        }
        mount_bpffs(system)?;
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| HostError::Setup(format!("creating pin directory {}: {e}", dir.display())))?;
    if !is_bpffs(dir) {
        mount_bpffs(dir)?;
    }
    Ok(())
}

/// Run `tc <args>` (the clsact qdisc on kernels without TCX).
pub fn tc(args: &[&str]) -> Result<String, HostError> {
    iproute2("tc", args)
}

/// Whether `dev` has a clsact qdisc (where classic TC filters hang, before TCX).
pub fn has_clsact(dev: &str) -> Result<bool, HostError> {
    Ok(tc(&["qdisc", "show", "dev", dev])?
        .lines()
        .any(|l| l.starts_with("qdisc clsact ")))
}

/// Whether any classic TC filter sits on `dev`'s clsact qdisc, in either direction.
pub fn has_tc_filters(dev: &str) -> Result<bool, HostError> {
    for dir in ["ingress", "egress"] {
        if !tc(&["filter", "show", "dev", dev, dir])?.trim().is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

pub fn route_replace(network: Ipv4Network, dev: &str) -> Result<(), HostError> {
    ip(&["route", "replace", &network.to_string(), "dev", dev])?;
    tracing::info!(%network, dev, "route to the overlay network");
    Ok(())
}

pub fn delete_link(name: &str) -> Result<(), HostError> {
    ip(&["link", "del", "dev", name]).map(|_| ())
}

/// Write a sysctl under /proc/sys (per network namespace), e.g. `net/ipv4/ip_forward`.
pub fn sysctl_set(key: &str, value: &str) -> Result<(), HostError> {
    let path = format!("/proc/sys/{key}");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    if old.trim() == value {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|e| HostError::Sysctl {
        key: key.replace('/', "."),
        message: e.to_string(),
    })?;
    tracing::info!(sysctl = %key.replace('/', "."), from = old.trim(), to = value, "set sysctl");
    Ok(())
}
