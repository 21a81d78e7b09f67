//! The lab per backend: two hosts with a container each, wired as flannel wires them for the
//! baselines, or with etcd and `overlay agent` on each host for ours. The IPv6 backends get a
//! dual-stack lab: IPv6 on the underlay, on `docker0` and on the containers besides IPv4.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnetwork::{Ipv4Network, Ipv6Network};
use overlay::backend::tun_udp::{DEFAULT_PORT as TUN_UDP_PORT, TunUdp, TunUdpSpec};
use overlay_tests::{
    cluster::HEALTHZ_PORT,
    etcd::Etcd,
    lab::{self, Backend, Host, Lab, OverlayProcess},
    netns::Netns,
    traffic,
};
use serde_json::Value;

use crate::{
    STOP,
    options::{BenchBackend, IpFamily, Underlay},
};

pub const UNDERLAY_MTU: u32 = 1500;

/// The overlay network of every backend; each host's subnet is `lab::static_subnet(i)` in it.
const NETWORK: &str = "10.244.0.0/16";
/// flannel's `IPv6Network` of the IPv6 backends; host i's IPv6 subnet is [`subnet6`]`(i)` in it.
const NETWORK6: &str = "fd00:244::/56";
/// How long an agent has to print its ready line (etcd, lease, programs loaded and attached).
const AGENT_READY: Duration = Duration::from_secs(30);
/// How long the agents have to learn each other and to put the bridge program in place.
const AGENT_SETTLE: Duration = Duration::from_secs(20);

/// One end of a test: a namespace and the address the other end reaches it at.
#[derive(Clone, Copy)]
pub struct Endpoint<'a> {
    pub ns: &'a Netns,
    pub ip: IpAddr,
}

/// Host `index`'s IPv6 underlay address (its PublicIPv6), beside its IPv4 one on `eth0`.
pub fn underlay6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, index as u16)
}

/// Host `index`'s IPv6 container subnet: `docker0` has its first address (docker's
/// `--fixed-cidr-v6` gateway), the container the second.
pub fn subnet6(index: usize) -> Ipv6Network {
    Ipv6Network::new(Ipv6Addr::new(0xfd00, 0x244, 0, index as u16, 0, 0, 0, 0), 64).expect("valid")
}

fn nth6(subnet: Ipv6Network, n: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(subnet.network()) + n)
}

/// Two hosts with one container each, wired for one backend.
pub struct Topology {
    pub backend: BenchBackend,
    // Field order is drop order: the agents stop, then etcd and the agents' files go, then the
    // namespaces. `build` fills a Topology in place, so a failed setup unwinds in this order too.
    /// Our `overlay agent` per host, for the eBPF backends.
    pub datapaths: Vec<OverlayProcess>,
    pub forwarders: Vec<TunUdp>,
    control: Option<ControlPlane>,
    pub lab: Lab,
}

/// What the agents run against, held for its drop (etcd stopped, its data and the files
/// removed): etcd in host1's namespace and a directory of per-host files (subnet files, bpffs
/// pin directories).
struct ControlPlane {
    _etcd: Etcd,
    _dir: tempfile::TempDir,
}

impl Topology {
    pub fn build(backend: BenchBackend, underlay: Underlay) -> anyhow::Result<Self> {
        // Lab joins two hosts by a bare veth and more by a bridge: for the bridge, a third
        // host is made and removed at once, which leaves its switch port unused.
        let n = match underlay {
            Underlay::Veth => 2,
            Underlay::Bridge => 3,
        };
        let mut lab = Lab::new(n, UNDERLAY_MTU).context("creating the lab")?;
        lab.hosts.truncate(2);
        for h in lab.hosts.iter_mut() {
            h.add_containers(lab::static_subnet(h.index), backend.container_mtu(), 1)
                .with_context(|| format!("adding a container to host{}", h.index))?;
            if backend.family() == IpFamily::V6 {
                add_ipv6(h).with_context(|| format!("IPv6 on host{}", h.index))?;
            }
        }
        let mut topo = Topology {
            backend,
            datapaths: Vec::new(),
            forwarders: Vec::new(),
            control: None,
            lab,
        };
        let lab = &topo.lab;
        match backend {
            BenchBackend::Underlay => {}
            BenchBackend::UserspaceUdp => {
                // As tun_udp_e2e starts it: device, address, route and socket made by a thread
                // inside the host's namespace; the forwarding threads run in this process.
                for h in &lab.hosts {
                    let spec = TunUdpSpec {
                        device: "flannel0".into(),
                        public_ip: h.public_ip,
                        port: TUN_UDP_PORT,
                        subnet: lab::static_subnet(h.index),
                        network: NETWORK.parse().expect("valid"),
                        mtu: backend.container_mtu(),
                    };
                    let forwarder =
                        h.ns.spawn(move || TunUdp::start(spec))
                            .join()
                            .map_err(|_| anyhow::anyhow!("TunUdp start thread panicked"))??
                            .with_context(|| format!("starting the udp forwarder on {}", h.name()))?;
                    for peer in lab.hosts.iter().filter(|p| p.index != h.index) {
                        forwarder.upsert_peer(lab::static_subnet(peer.index), peer.public_ip);
                    }
                    topo.forwarders.push(forwarder);
                }
            }
            BenchBackend::HostGw => {
                // flannel's host-gw: a plain route to each peer's subnet via its PublicIP.
                for h in &lab.hosts {
                    for peer in lab.hosts.iter().filter(|p| p.index != h.index) {
                        let subnet = lab::static_subnet(peer.index).to_string();
                        h.ns.ip(&["route", "add", &subnet, "via", &peer.public_ip.to_string()])
                            .with_context(|| format!("host-gw route on {}", h.name()))?;
                    }
                }
            }
            BenchBackend::HostGwV6 => {
                // flannel's host-gw for IPv6: a route to each peer's IPv6 subnet via its
                // PublicIPv6.
                for h in &lab.hosts {
                    for peer in lab.hosts.iter().filter(|p| p.index != h.index) {
                        let (subnet, via) = (subnet6(peer.index).to_string(), underlay6(peer.index).to_string());
                        h.ns.ip(&["-6", "route", "add", &subnet, "via", &via])
                            .with_context(|| format!("host-gw IPv6 route on {}", h.name()))?;
                    }
                }
            }
            BenchBackend::KernelVxlan => {
                for h in &lab.hosts {
                    let subnet = lab::static_subnet(h.index);
                    lab::flannel_vxlan_host(
                        &h.ns,
                        &h.iface,
                        h.public_ip,
                        subnet,
                        &lab::static_vtep_mac(h.index),
                        UNDERLAY_MTU,
                    )
                    .with_context(|| format!("flannel.1 on {}", h.name()))?;
                }
                for h in &lab.hosts {
                    for peer in lab.hosts.iter().filter(|p| p.index != h.index) {
                        let mac = lab::static_vtep_mac(peer.index);
                        lab::flannel_vxlan_add_peer(&h.ns, lab::static_subnet(peer.index), peer.public_ip, &mac)
                            .with_context(|| format!("flannel.1 peer entries on {}", h.name()))?;
                    }
                }
            }
            _ => topo.start_agents()?,
        }
        if backend.family() == IpFamily::V6 {
            topo.wait_ipv6_reachable()?;
        }
        Ok(topo)
    }

    /// Wait until the containers answer each other over IPv6: on links a moment old, the
    /// first packets can go unanswered (neighbour discovery on the fresh underlay), which
    /// would fail the connectivity check or cost the first measurement.
    fn wait_ipv6_reachable(&self) -> anyhow::Result<()> {
        let hosts = &self.lab.hosts;
        wait_until("the containers reach each other over IPv6", AGENT_SETTLE, || {
            for (from, to) in [(0, 1), (1, 0)] {
                let dst = nth6(subnet6(hosts[to].index), 2);
                let r = traffic::ping(&hosts[from].containers[0].ns, dst, 1, 56, false, "0.05")?;
                if r.received == 0 {
                    bail!("{dst} does not answer host{}'s container", hosts[from].index);
                }
            }
            Ok(())
        })
    }

    /// etcd in host1's namespace on its underlay address, the network config in it, then
    /// `overlay agent` on each host, each made to lease the static subnet its container is on.
    fn start_agents(&mut self) -> anyhow::Result<()> {
        let run = self.backend.agent().expect("a backend with agents");
        let family = self.backend.family();
        let h1 = &self.lab.hosts[0];
        let etcd = Etcd::try_start_in_netns(h1.ns.name(), h1.public_ip).context("starting etcd in host1")?;
        let dir = tempfile::Builder::new()
            .prefix("overlay-bench-")
            .tempdir()
            .context("creating a directory for the agents' files")?;
        let endpoint = etcd.endpoint();
        let dir_path = dir.path().to_path_buf();
        self.control = Some(ControlPlane { _etcd: etcd, _dir: dir });
        let overlay = lab::workspace_bin("overlay");
        overlay_tests::netns::run(
            h1.ns
                .command(overlay.to_str().context("non-UTF-8 path of the overlay binary")?)
                .args([
                    "config",
                    "set",
                    "--etcd-endpoints",
                    &endpoint,
                    &network_config(run.format, family),
                ]),
        )
        .context("writing the network config to etcd")?;

        for h in &self.lab.hosts {
            let subnet = lab::static_subnet(h.index);
            let host_dir = dir_path.join(h.name());
            std::fs::create_dir_all(&host_dir).with_context(|| format!("creating {}", host_dir.display()))?;
            // The agent reuses the subnet its subnet file names, as flanneld does after a
            // restart: this is how it comes to lease the subnet docker0 was made with.
            let subnet_file = host_dir.join("subnet.env");
            let subnet6 = (family == IpFamily::V6).then(|| subnet6(h.index));
            std::fs::write(
                &subnet_file,
                seeded_subnet_file(subnet, subnet6, self.backend.agent_mtu()),
            )
            .with_context(|| format!("writing {}", subnet_file.display()))?;
            // A pin directory per host: the agent mounts a bpffs there (inside the private
            // mount namespace `ip netns exec` gives it, so it goes when the agent exits).
            let pin_dir = host_dir.join("bpf");
            let args = agent_args(&endpoint, &h.iface, &subnet_file, &pin_dir, run.datapath, run.extra);
            let agent = OverlayProcess::start(&h.ns, &args, AGENT_READY)
                .with_context(|| format!("starting `overlay agent` on {}", h.name()))?;
            let leased = agent.ready["subnet"].as_str().unwrap_or("none").to_string();
            let mtu = agent.ready["mtu"].as_u64();
            let leased6 = agent.ready["ipv6_subnet"].as_str().map(String::from);
            self.datapaths.push(agent);
            if leased != subnet.to_string() {
                bail!(
                    "the agent on {} leased {leased}, not {subnet}, the subnet its container is on \
                     (pre-seeded in {}): the bench needs the agent to reuse the subnet of its subnet file",
                    h.name(),
                    subnet_file.display()
                );
            }
            if let Some(want) = subnet6
                && leased6 != Some(want.to_string())
            {
                bail!(
                    "the agent on {} leased IPv6 subnet {leased6:?}, not {want}, the one its container is on \
                     (pre-seeded in {})",
                    h.name(),
                    subnet_file.display()
                );
            }
            if mtu != Some(self.backend.agent_mtu().into()) {
                bail!(
                    "the agent on {} reports MTU {mtu:?}; the bench expects {} (container MTU {})",
                    h.name(),
                    self.backend.agent_mtu(),
                    self.backend.container_mtu()
                );
            }
        }
        self.wait_agents_settled()
    }

    /// Wait until each agent has the other host as a peer and, with TC decap, until its tick
    /// has attached the bridge program and copied the container's MAC: frames then leave
    /// `docker0` straight for the container's port (`bridge_redirect`), as they will for the
    /// whole measurement.
    fn wait_agents_settled(&self) -> anyhow::Result<()> {
        let hosts = &self.lab.hosts;
        wait_until("each agent has the other host as a peer", AGENT_SETTLE, || {
            for h in hosts {
                let peers = agent_peers(&h.ns)?;
                for other in hosts.iter().filter(|o| o.index != h.index) {
                    let want = lab::static_subnet(other.index).to_string();
                    if !peers.contains(&want) {
                        bail!("{}'s agent has peers {peers:?}, not yet {want}", h.name());
                    }
                }
            }
            Ok(())
        })?;
        if self.backend.ebpf().is_none() {
            // The kernel's datapath: no programs, no counters to wait for.
            return Ok(());
        }
        let modes = self.xdp_modes();
        // With host routing the shortcut delivers to the containers (before the bridge, so
        // the bridge program sees none of it); without, the bridge program does with TC decap.
        let host_routing = self.backend.host_routing() == Some("bpf");
        if !host_routing && !modes.iter().any(|m| m == "tc") {
            // XDP decap: no bridge program (the decapsulated skb carries no tunnel marking).
            return Ok(());
        }
        let counter = if host_routing {
            "shortcut_to_container"
        } else {
            "bridge_redirect"
        };
        wait_until(
            &format!("the agents deliver to the containers on their fast path ({counter})"),
            AGENT_SETTLE,
            || {
                for (from, to) in [(0, 1), (1, 0)] {
                    let (c_from, c_to) = (&hosts[from].containers[0], &hosts[to].containers[0]);
                    traffic::ping(&c_from.ns, c_to.ip, 2, 56, false, "0.05")?;
                }
                let mut delivered = Vec::new();
                for (agent, mode) in self.datapaths.iter().zip(&modes) {
                    let n = agent.counters()?["counters"][counter]["packets"].as_u64().unwrap_or(0);
                    delivered.push((host_routing || mode == "tc").then_some(n));
                }
                if delivered.iter().flatten().any(|&n| n == 0) {
                    bail!("{counter} packets per host (none: not expected there): {delivered:?}");
                }
                Ok(())
            },
        )?;
        Ok(())
    }

    /// Where traffic starts: c1, or host1 itself for the bare underlay.
    pub fn client(&self) -> Endpoint<'_> {
        self.endpoint(0)
    }

    pub fn server(&self) -> Endpoint<'_> {
        self.endpoint(1)
    }

    fn endpoint(&self, host: usize) -> Endpoint<'_> {
        let h = &self.lab.hosts[host];
        match (self.backend, self.backend.family()) {
            (BenchBackend::Underlay, _) => Endpoint {
                ns: &h.ns,
                ip: h.public_ip.into(),
            },
            (_, IpFamily::V4) => Endpoint {
                ns: &h.containers[0].ns,
                ip: h.containers[0].ip.into(),
            },
            (_, IpFamily::V6) => Endpoint {
                ns: &h.containers[0].ns,
                ip: nth6(subnet6(h.index), 2).into(),
            },
        }
    }

    /// Decap hook per host as the agent reported it: "tc", or the XDP attach mode ("Driver" =
    /// native, "Skb" = generic), the words the table and earlier JSON use.
    pub fn xdp_modes(&self) -> Vec<String> {
        self.datapaths
            .iter()
            .map(|p| decap_mode(p.ready["backend"].as_str().unwrap_or_default()).unwrap_or_else(|| "?".into()))
            .collect()
    }

    /// Stop the agents and return their final counters, host by host.
    pub fn stop_datapaths(&mut self) -> anyhow::Result<Vec<Value>> {
        self.datapaths.drain(..).map(|p| p.stop()).collect()
    }
}

/// The network config as flannel users write it, for our format; dual stack for IPv6.
pub fn network_config(format: Backend, family: IpFamily) -> String {
    let ipv6 = match family {
        IpFamily::V4 => String::new(),
        IpFamily::V6 => format!(r#""EnableIPv6":true,"IPv6Network":"{NETWORK6}","IPv6SubnetLen":64,"#),
    };
    format!(
        r#"{{"Network":"{NETWORK}","SubnetLen":24,{ipv6}"Backend":{{"Type":"{}"}}}}"#,
        format.name()
    )
}

/// A subnet file as the agent (and flanneld) writes it for `subnet` (and `subnet6`): what a
/// host has after a previous run, and where the agent looks for the subnets to ask for again.
fn seeded_subnet_file(subnet: Ipv4Network, subnet6: Option<Ipv6Network>, mtu: u32) -> String {
    let first = Ipv4Addr::from(u32::from(subnet.network()) + 1);
    let mut env = format!(
        "FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={first}/{}\n",
        subnet.prefix()
    );
    if let Some(v6) = subnet6 {
        env += &format!(
            "FLANNEL_IPV6_NETWORK={NETWORK6}\nFLANNEL_IPV6_SUBNET={}/{}\n",
            nth6(v6, 1),
            v6.prefix()
        );
    }
    env + &format!("FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=false\n")
}

/// The IPv6 side of a host, as a dual-stack docker host has it: its PublicIPv6 on the
/// underlay, forwarding on, `docker0`'s gateway address and its container's address and
/// default route, from [`subnet6`].
fn add_ipv6(host: &Host) -> anyhow::Result<()> {
    let (i, subnet) = (host.index, subnet6(host.index));
    let (gw, ip) = (nth6(subnet, 1), nth6(subnet, 2));
    let ns = &host.ns;
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    // nodad: the addresses are usable at once, as on a host that has been up for a while.
    let underlay = format!("{}/64", underlay6(i));
    ns.ip(&["-6", "addr", "add", &underlay, "dev", &host.iface, "nodad"])?;
    let gw_cidr = format!("{gw}/{}", subnet.prefix());
    ns.ip(&["-6", "addr", "add", &gw_cidr, "dev", "docker0", "nodad"])?;
    for c in &host.containers {
        let cidr = format!("{ip}/{}", subnet.prefix());
        c.ns.ip(&["-6", "addr", "add", &cidr, "dev", "eth0", "nodad"])?;
        c.ns.ip(&["-6", "route", "add", "default", "via", &gw.to_string()])?;
    }
    // A fresh bridge port passes neighbour solicitations once the container has reported its
    // multicast groups: wait until the host reaches its container, as a docker host has.
    wait_until(
        &format!("host{i} reaches its container at {ip}"),
        Duration::from_secs(10),
        || {
            let r = traffic::ping(ns, ip, 1, 56, false, "0.05")?;
            if r.received == 0 {
                bail!("no answer");
            }
            Ok(())
        },
    )
}

/// The flags of `overlay agent` on one host: flanneld's, our per-host paths, /status on the
/// host's loopback for the wait, then the backend's own (`--decap`, `--xdp-mode`).
/// `--datapath ebpf` for ours: fail rather than measure the kernel fallback. No FORWARD rules: the
/// hosts' FORWARD policy is ACCEPT, and the baselines get none either (netfilter hooks in the
/// path would cost our backends alone).
fn agent_args(
    endpoint: &str,
    iface: &str,
    subnet_file: &Path,
    pin_dir: &Path,
    datapath: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "agent".into(),
        format!("--etcd-endpoints={endpoint}"),
        format!("--iface={iface}"),
        format!("--subnet-file={}", subnet_file.display()),
        format!("--pin-dir={}", pin_dir.display()),
        "--healthz-ip=127.0.0.1".into(),
        format!("--healthz-port={HEALTHZ_PORT}"),
        format!("--datapath={datapath}"),
        "--iptables-forward-rules=false".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Peer subnets of the agent in `ns`, from its /status.
fn agent_peers(ns: &Netns) -> anyhow::Result<Vec<String>> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, HEALTHZ_PORT));
    let body = ns
        .spawn(move || overlay::cli::status::http_get(addr, "/status"))
        .join()
        .map_err(|_| anyhow::anyhow!("/status thread panicked"))???;
    let status: Value = serde_json::from_str(&body).context("unreadable /status")?;
    Ok(status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["subnet"].as_str().map(String::from))
        .collect())
}

/// The decap hook in the `backend` of an agent's ready line ("ebpf-vxlan (decap tc, device
/// ovl0)", "... (decap xdp driver, ...)", "... (decap xdp skb, ...)"), in the words of the
/// static datapath's ready line: "tc", or the XDP attach mode "Driver" or "Skb".
fn decap_mode(backend: &str) -> Option<String> {
    if backend.starts_with("ebpf-host-gw") {
        // No tunnel, nothing decapsulates.
        return Some("none".into());
    }
    let mode = backend.split_once("(decap ")?.1.split([',', ')']).next()?.trim();
    Some(match mode {
        "xdp driver" => "Driver".into(),
        "xdp skb" => "Skb".into(),
        other => other.into(),
    })
}

/// Poll `check` until it returns Ok; its error says what is not there yet, and is reported if
/// `timeout` passes first. Stops at once when the run is interrupted.
fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let why = match check() {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if STOP.load(Ordering::Relaxed) {
            bail!("{what}: interrupted");
        }
        if start.elapsed() > timeout {
            bail!("{what}: not after {timeout:?}: {why:#}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn decap_mode_from_the_agents_backend_line() {
        assert_eq!(decap_mode("ebpf-vxlan (decap tc, device ovl0)").as_deref(), Some("tc"));
        assert_eq!(decap_mode("ebpf-udp (decap tc, device ovl0)").as_deref(), Some("tc"));
        assert_eq!(
            decap_mode("ebpf-vxlan (decap xdp driver, device ovl0)").as_deref(),
            Some("Driver")
        );
        assert_eq!(
            decap_mode("ebpf-vxlan (decap xdp skb, device ovl0)").as_deref(),
            Some("Skb")
        );
        assert_eq!(
            decap_mode("ebpf-vxlan (decap xdp adopted, device ovl0)").as_deref(),
            Some("xdp adopted")
        );
        assert_eq!(decap_mode("kernel vxlan"), None);
    }

    #[test]
    fn seeded_subnet_file_is_reused_by_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        for i in [1, 2] {
            std::fs::write(&path, seeded_subnet_file(lab::static_subnet(i), None, 1450)).unwrap();
            let (v4, v6) = overlay::subnet::file::read_previous_subnets(&path);
            assert_eq!(v4, Some(lab::static_subnet(i)));
            assert_eq!(v6, None);
            std::fs::write(&path, seeded_subnet_file(lab::static_subnet(i), Some(subnet6(i)), 1450)).unwrap();
            let (v4, v6) = overlay::subnet::file::read_previous_subnets(&path);
            assert_eq!(v4, Some(lab::static_subnet(i)));
            assert_eq!(v6, Some(subnet6(i)));
        }
        let env = seeded_subnet_file(lab::static_subnet(2), None, 1472);
        assert!(env.contains("FLANNEL_SUBNET=10.244.2.1/24\n"), "{env}");
        assert!(env.contains("FLANNEL_MTU=1472\n"), "{env}");
        assert!(!env.contains("IPV6"), "{env}");
        let env = seeded_subnet_file(lab::static_subnet(2), Some(subnet6(2)), 1450);
        assert!(
            env.contains("FLANNEL_IPV6_NETWORK=fd00:244::/56\nFLANNEL_IPV6_SUBNET=fd00:244:0:2::1/64\n"),
            "{env}"
        );
        let vars = overlay::subnet::file::parse_env(&env);
        assert_eq!(vars.get("FLANNEL_MTU").map(String::as_str), Some("1450"));
    }

    #[test]
    fn network_config_as_flannel_users_write_it() {
        assert_eq!(
            network_config(Backend::Vxlan, IpFamily::V4),
            r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#
        );
        let v: Value = serde_json::from_str(&network_config(Backend::Udp, IpFamily::V4)).unwrap();
        assert_eq!(v["Backend"]["Type"], "udp");
        // Dual stack as flannel users turn it on; our config parser takes it.
        let dual = network_config(Backend::Vxlan, IpFamily::V6);
        let v: Value = serde_json::from_str(&dual).unwrap();
        assert_eq!(
            (&v["EnableIPv6"], &v["IPv6Network"]),
            (&json!(true), &json!("fd00:244::/56"))
        );
        let config = overlay::subnet::config::NetworkConfig::parse(&dual).unwrap();
        assert!(config.ipv4.is_some() && config.ipv6.is_some());
        for i in [1, 2] {
            let pool: Ipv6Network = NETWORK6.parse().unwrap();
            assert!(pool.contains(subnet6(i).network()) && subnet6(i).prefix() == 64);
        }
        assert_eq!(subnet6(2).to_string(), "fd00:244:0:2::/64");
        assert_eq!(underlay6(1).to_string(), "fc00::1");
        let args = agent_args(
            "http://192.168.250.1:2379",
            "eth0",
            Path::new("/t/host1/subnet.env"),
            Path::new("/t/host1/bpf"),
            "ebpf",
            &["--decap", "xdp"],
        );
        assert_eq!(args[0], "agent");
        for flag in [
            "--etcd-endpoints=http://192.168.250.1:2379", "--iface=eth0", "--subnet-file=/t/host1/subnet.env",
            "--pin-dir=/t/host1/bpf", "--datapath=ebpf",
        ] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing from {args:?}");
        }
        assert_eq!(args[args.len() - 2..], ["--decap", "xdp"]);
    }
}
