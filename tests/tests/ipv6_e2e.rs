//! IPv6 end to end with flannel's kernel datapath (`--datapath kernel`): agents started as a
//! flannel unit starts them (one dash, flanneld's flags, `ip netns exec`), a real etcd on the
//! lab's switch, containers built from the subnet file as docker would build them.
//!
//! - dual stack over a dual-stack underlay, vxlan: pings of both families both ways, 50 MB of
//!   TCP over IPv6 checked byte for byte, leases in flannel's format, ip6tables rules kept, and
//!   a flannel-style host (its `flannel.1` and `flannel-v6.1` programmed by hand as flanneld
//!   programs them, its lease written by hand in flannel's JSON) reached both ways;
//! - an IPv6-only network over an IPv6-only underlay (etcd reached over IPv6 too), on the kernel
//!   datapath and on our eBPF datapath, with a kernel-datapath host in the same network;
//! - host-gw with dual stack: IPv6 routes via each peer's PublicIPv6;
//! - vxlan `DirectRouting` with dual stack: a peer whose PublicIPv6 is on our link gets a route
//!   via it, one behind a router the tunnel, on both datapaths;
//! - the udp backend with IPv6 refused, naming the field.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnetwork::{Ipv4Network, Ipv6Network};
use overlay_tests::{
    etcd::Etcd,
    lab::{Lab, OverlayProcess, SWITCH_IP, flannel_vxlan_add_peer, flannel_vxlan_host, workspace_bin},
    netns::{Netns, run},
    traffic::{ping, tcp_transfer_verified},
};
use tempfile::TempDir;

const DUAL_VXLAN: &str =
    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/56","Backend":{"Type":"vxlan"}}"#;
const V6_ONLY_VXLAN: &str =
    r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/56","Backend":{"Type":"vxlan"}}"#;
const DUAL_HOST_GW: &str =
    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/56","Backend":{"Type":"host-gw"}}"#;
const DUAL_VXLAN_DIRECT: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/56","Backend":{"Type":"vxlan","DirectRouting":true}}"#;
const HEALTHZ_PORT: u16 = 9099;
const SWITCH_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 0xfe);

/// A host's IPv6 underlay address: fd01::<index>.
fn underlay_ipv6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, index as u16)
}

/// A container: its namespace and its addresses.
struct Container {
    ns: Netns,
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
}

/// Hosts on a switch with an IPv6 underlay (and an IPv4 one unless `v6_only`), etcd on the
/// switch, the network config stored.
struct V6Lab {
    /// Dropped first: namespaces before etcd.
    lab: Lab,
    containers: BTreeMap<usize, Container>,
    etcd: Etcd,
    dir: TempDir,
}

impl V6Lab {
    fn new(hosts: usize, config: &str, v6_only: bool) -> anyhow::Result<Self> {
        let lab = Lab::with_switch(hosts, 1500)?;
        let sw = lab.switch.as_ref().expect("switch");
        sw.ip(&["addr", "add", &format!("{SWITCH_IPV6}/64"), "dev", "sw0", "nodad"])?;
        for h in &lab.hosts {
            h.ns.ip(&[
                "addr",
                "add",
                &format!("{}/64", underlay_ipv6(h.index)),
                "dev",
                "eth0",
                "nodad",
            ])?;
            h.ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            if v6_only {
                h.ns.ip(&["-4", "addr", "flush", "dev", "eth0"])?;
            }
        }
        if v6_only {
            sw.ip(&["-4", "addr", "flush", "dev", "sw0"])?;
        }
        let etcd_at: IpAddr = if v6_only { SWITCH_IPV6.into() } else { SWITCH_IP.into() };
        let etcd = Etcd::start_in_netns(sw.name(), etcd_at);
        let dir = tempfile::Builder::new().prefix("overlay-v6-").tempdir()?;
        let l = V6Lab {
            lab,
            containers: BTreeMap::new(),
            etcd,
            dir,
        };
        l.on_switch(&["config", "set", "--etcd-endpoints", &l.etcd.endpoint(), config])?;
        Ok(l)
    }

    fn on_switch(&self, args: &[&str]) -> anyhow::Result<String> {
        run(self
            .lab
            .switch
            .as_ref()
            .expect("switch")
            .command(workspace_bin("overlay").to_str().expect("utf-8"))
            .args(args))
    }

    fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        run(self
            .lab
            .switch
            .as_ref()
            .expect("switch")
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.etcd.endpoint()))
            .args(args))
    }

    fn subnet_file(&self, index: usize) -> PathBuf {
        self.dir.path().join(format!("host{index}.env"))
    }

    fn host(&self, index: usize) -> &Netns {
        &self.lab.host(index).ns
    }

    /// The agent as a flannel unit starts it, with the kernel datapath.
    fn start_agent(&self, index: usize, extra: &[&str]) -> anyhow::Result<OverlayProcess> {
        let mut args = vec!["--datapath=kernel"];
        args.extend(extra);
        self.start_flannel_unit(index, &args)
    }

    /// The agent as a flannel unit starts it: flanneld's flags, our defaults (`--datapath
    /// auto`) unless `extra` says otherwise.
    fn start_flannel_unit(&self, index: usize, extra: &[&str]) -> anyhow::Result<OverlayProcess> {
        let mut args: Vec<String> = vec![
            "agent".into(),
            format!("-etcd-endpoints={}", self.etcd.endpoint()),
            "-iface=eth0".into(),
            "-ip-masq".into(),
            format!("-subnet-file={}", self.subnet_file(index).display()),
            "-healthz-ip=127.0.0.1".into(),
            format!("-healthz-port={HEALTHZ_PORT}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        OverlayProcess::start(self.host(index), &args, Duration::from_secs(30))
            .with_context(|| format!("starting the agent on host{index}"))
    }

    /// docker0 and one container on host `index`, from the subnet file as docker's `--bip`,
    /// `--mtu` and `--fixed-cidr-v6` would make them.
    fn add_container_from_subnet_file(&mut self, index: usize) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(self.subnet_file(index))?;
        let vars: BTreeMap<String, String> = overlay::subnet::file::parse_env(&text);
        let mtu = vars.get("FLANNEL_MTU").context("no FLANNEL_MTU")?.clone();
        let v4: Option<Ipv4Network> = vars.get("FLANNEL_SUBNET").map(|s| s.parse()).transpose()?;
        let v6: Option<Ipv6Network> = vars.get("FLANNEL_IPV6_SUBNET").map(|s| s.parse()).transpose()?;
        self.add_container(index, v4, v6, &mtu)
    }

    fn add_container(
        &mut self,
        index: usize,
        v4: Option<Ipv4Network>,
        v6: Option<Ipv6Network>,
        mtu: &str,
    ) -> anyhow::Result<()> {
        let host = &self.lab.host(index).ns;
        host.ip(&["link", "add", "docker0", "type", "bridge"])?;
        host.ip(&["link", "set", "docker0", "mtu", mtu, "up"])?;
        let c = Netns::new(&format!("c{index}"))?;
        host.ip(&[
            "link",
            "add",
            "veth0",
            "mtu",
            mtu,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            c.name(),
        ])?;
        host.ip(&["link", "set", "veth0", "master", "docker0", "up"])?;
        c.ip(&["link", "set", "eth0", "mtu", mtu, "up"])?;
        let mut container = Container {
            ns: c,
            ipv4: None,
            ipv6: None,
        };
        if let Some(bip) = v4 {
            // FLANNEL_SUBNET is the bridge's address (--bip); the container takes the next.
            let ip = Ipv4Addr::from(u32::from(bip.ip()) + 1);
            host.ip(&["addr", "add", &bip.to_string(), "dev", "docker0"])?;
            container
                .ns
                .ip(&["addr", "add", &format!("{ip}/{}", bip.prefix()), "dev", "eth0"])?;
            container
                .ns
                .ip(&["route", "add", "default", "via", &bip.ip().to_string()])?;
            container.ipv4 = Some(ip);
        }
        if let Some(gw) = v6 {
            let ip = Ipv6Addr::from(u128::from(gw.ip()) + 1);
            host.ip(&["-6", "addr", "add", &gw.to_string(), "dev", "docker0", "nodad"])?;
            container.ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip}/{}", gw.prefix()),
                "dev",
                "eth0",
                "nodad",
            ])?;
            container
                .ns
                .ip(&["-6", "route", "add", "default", "via", &gw.ip().to_string()])?;
            container.ipv6 = Some(ip);
            // A fresh port's IPv6 (neighbour discovery, multicast snooping on the bridge) takes
            // a moment; wait until the host reaches its container, as docker's would by then.
            let start = Instant::now();
            while host
                .exec("ping", &["-n", "-c", "1", "-W", "1", &ip.to_string()])
                .is_err()
            {
                if start.elapsed() > Duration::from_secs(10) {
                    bail!("host{index} does not reach its container at {ip}");
                }
            }
        }
        self.containers.insert(index, container);
        Ok(())
    }

    /// An HTTP GET to the agent on host `index`.
    fn agent_get(&self, index: usize, path: &'static str) -> anyhow::Result<String> {
        let addr = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, HEALTHZ_PORT));
        self.host(index)
            .spawn(move || overlay::cli::status::http_get(addr, path))
            .join()
            .expect("thread")?
    }

    /// The agent's `/status` on host `index`.
    fn status(&self, index: usize) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.agent_get(index, "/status")?)?)
    }

    fn container(&self, index: usize) -> &Container {
        &self.containers[&index]
    }

    /// Every ping of `count` from container `from` to `to` answered.
    fn pings(&self, from: usize, to: IpAddr) -> anyhow::Result<()> {
        let r = ping(&self.container(from).ns, to, 5, 56, false, "0.2")?;
        if r.received != r.transmitted || r.transmitted != 5 {
            let mut state = String::new();
            for i in 1..=self.lab.hosts.len() {
                for args in [
                    &["-6", "route", "show"][..],
                    &["-6", "neigh", "show"],
                    &["-6", "addr", "show"],
                    &["-d", "link", "show"],
                ] {
                    state += &format!("host{i} ip {args:?}:\n{}\n", self.host(i).ip(args).unwrap_or_default());
                }
                state += &format!(
                    "host{i} fdb:\n{}\n",
                    run(self.host(i).command("bridge").args(["fdb", "show"])).unwrap_or_default()
                );
            }
            bail!(
                "container {from} -> {to}: {} of {} pings answered; the hosts:\n{state}",
                r.received,
                r.transmitted
            );
        }
        Ok(())
    }

    /// The leases in etcd, key to JSON value.
    fn leases(&self) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
        let out = self.etcdctl(&["get", "--prefix", "/coreos.com/network/subnets/"])?;
        let lines: Vec<&str> = out.lines().collect();
        let mut leases = BTreeMap::new();
        for pair in lines.chunks(2) {
            if let [key, value] = pair {
                let segment = key.rsplit('/').next().unwrap_or_default().to_string();
                leases.insert(segment, serde_json::from_str(value)?);
            }
        }
        Ok(leases)
    }

    /// Wait until `check` holds (agents apply leases within a second).
    fn wait_until(&self, what: &str, mut check: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < Duration::from_secs(15) {
            match check() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{what}: not true after 15 s {last}")
    }
}

/// The lease value in the agent's ready line.
fn ready_lease(agent: &OverlayProcess) -> anyhow::Result<serde_json::Value> {
    let text = agent.ready["lease"].as_str().context("ready line without lease")?;
    Ok(serde_json::from_str(text)?)
}

fn vtep_macs(lease: &serde_json::Value) -> (String, String) {
    let mac = |field: &str| lease[field]["VtepMAC"].as_str().unwrap_or_default().to_string();
    (mac("BackendData"), mac("BackendV6Data"))
}

fn link_mac(ns: &Netns, dev: &str) -> anyhow::Result<String> {
    let v: serde_json::Value = serde_json::from_str(&ns.ip(&["-j", "link", "show", dev])?)?;
    Ok(v[0]["address"].as_str().context("no MAC")?.to_string())
}

#[test]
fn dual_stack_vxlan_kernel_datapath_with_a_flannel_style_host() -> anyhow::Result<()> {
    let mut l = V6Lab::new(3, DUAL_VXLAN, false)?;

    // Host 3 is flannel, programmed by hand as flanneld programs it, its lease written by hand
    // in flannel's JSON before the agents start (so they leave its subnets alone).
    let (f_v4, f_v6): (Ipv4Network, Ipv6Network) = ("10.244.200.0/24".parse()?, "fd00:244:0:c8::/64".parse()?);
    let (f_mac, f_mac6) = ("0e:f1:00:00:00:03", "0e:f1:00:00:06:03");
    let f_ip = l.lab.host(3).public_ip;
    flannel_vxlan_host(l.host(3), "eth0", f_ip, f_v4, f_mac, 1500)?;
    let f = l.host(3);
    f.ip(&[
        "link",
        "add",
        "flannel-v6.1",
        "address",
        f_mac6,
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &underlay_ipv6(3).to_string(),
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ])?;
    // The kernel's limit for vxlan over IPv6 on a 1500 underlay, 1450 is refused (the agent
    // takes 1430 too).
    f.ip(&["link", "set", "flannel-v6.1", "mtu", "1430", "up"])?;
    f.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/128", f_v6.network()),
        "dev",
        "flannel-v6.1",
    ])?;
    let grant = l.etcdctl(&["lease", "grant", "600"])?;
    let lease_id = grant
        .split_whitespace()
        .nth(1)
        .context("lease grant output")?
        .to_string();
    let flannel_key = "/coreos.com/network/subnets/10.244.200.0-24&fd00:244:0:c8::-64";
    let flannel_value = format!(
        r#"{{"PublicIP":"{f_ip}","PublicIPv6":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{f_mac}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{f_mac6}"}}}}"#,
        underlay_ipv6(3)
    );
    l.etcdctl(&["put", "--lease", &lease_id, flannel_key, &flannel_value])?;

    let a1 = l.start_agent(1, &["-iptables-resync=1"])?;
    let a2 = l.start_agent(2, &[])?;

    // Leases as flannel writes them: dual-stack key, PublicIPv6, BackendV6Data with the MAC of
    // flannel-v6.1.
    let leases = l.leases()?;
    assert_eq!(leases.len(), 3, "{leases:?}");
    for (i, agent) in [(1, &a1), (2, &a2)] {
        let lease = ready_lease(agent)?;
        assert_eq!(lease["PublicIPv6"], underlay_ipv6(i).to_string(), "{lease}");
        let (mac4, mac6) = vtep_macs(&lease);
        assert_eq!(mac4, link_mac(l.host(i), "flannel.1")?);
        assert_eq!(mac6, link_mac(l.host(i), "flannel-v6.1")?);
        assert_ne!(mac4, mac6);
        let v6 = agent.ready["ipv6_subnet"].as_str().context("no ipv6_subnet")?;
        let v6: Ipv6Network = v6.parse()?;
        let key = format!(
            "{}&{}-{}",
            agent.ready["subnet"].as_str().unwrap_or_default().replace('/', "-"),
            v6.network(),
            v6.prefix()
        );
        assert_eq!(leases.get(&key), Some(&lease), "key {key} in {leases:?}");
        let file = std::fs::read_to_string(l.subnet_file(i))?;
        assert!(
            file.contains("FLANNEL_IPV6_NETWORK=fd00:244::/56\n")
                && file.contains(&format!(
                    "FLANNEL_IPV6_SUBNET={}/64\n",
                    Ipv6Addr::from(u128::from(v6.network()) + 1)
                )),
            "{file}"
        );
    }

    // The flannel host learns the agents' leases as flanneld would.
    for agent in [&a1, &a2] {
        let lease = ready_lease(agent)?;
        let (mac4, mac6) = vtep_macs(&lease);
        let v4: Ipv4Network = agent.ready["subnet"].as_str().unwrap_or_default().parse()?;
        let public_ip: Ipv4Addr = lease["PublicIP"].as_str().unwrap_or_default().parse()?;
        flannel_vxlan_add_peer(l.host(3), v4, public_ip, &mac4)?;
        let v6: Ipv6Network = agent.ready["ipv6_subnet"].as_str().unwrap_or_default().parse()?;
        let gw = v6.network().to_string();
        let f = l.host(3);
        f.ip(&[
            "-6", "neigh", "replace", &gw, "lladdr", &mac6, "dev", "flannel-v6.1", "nud", "permanent",
        ])?;
        run(f.command("bridge").args([
            "fdb",
            "append",
            &mac6,
            "dev",
            "flannel-v6.1",
            "dst",
            lease["PublicIPv6"].as_str().unwrap_or_default(),
        ]))?;
        f.ip(&[
            "-6",
            "route",
            "replace",
            &v6.to_string(),
            "via",
            &gw,
            "dev",
            "flannel-v6.1",
            "onlink",
        ])?;
    }

    for i in 1..=2 {
        l.add_container_from_subnet_file(i)?;
    }
    l.add_container(
        3,
        Some(Ipv4Network::new(Ipv4Addr::new(10, 244, 200, 1), 24)?),
        Some(Ipv6Network::new(Ipv6Addr::from(u128::from(f_v6.network()) + 1), 64)?),
        "1450",
    )?;
    // Every agent has both peers, with their IPv6 sides.
    l.wait_until("both agents have both peers", || {
        Ok([1, 2].iter().all(|i| {
            l.host(*i)
                .ip(&["-6", "route", "show", "dev", "flannel-v6.1", "proto", "73"])
                .is_ok_and(|r| r.lines().count() == 2)
        }))
    })?;

    // Both families, both ways, between the agents' containers and with the flannel host's.
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)] {
        let to = l.container(b);
        l.pings(a, to.ipv4.context("v4")?.into())?;
        l.pings(a, to.ipv6.context("v6")?.into())?;
    }

    // 50 MB over IPv6, every byte checked.
    let (c1, c2) = (l.container(1), l.container(2));
    let verified = tcp_transfer_verified(&c1.ns, &c2.ns, c2.ipv6.context("v6")?, 5201, 50 << 20)?;
    assert_eq!(verified, 50 << 20);
    let verified = tcp_transfer_verified(
        &c2.ns,
        &l.container(3).ns,
        l.container(3).ipv6.context("v6")?,
        5202,
        50 << 20,
    )?;
    assert_eq!(verified, 50 << 20);

    // ip6tables: flannel's chains for the IPv6 network, and put back after a flush.
    let h1 = l.host(1);
    let nat = h1.exec("ip6tables", &["-w", "-t", "nat", "-S", "FLANNEL-POSTRTG"])?;
    assert!(
        nat.contains("-s fd00:244::/56 ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE"),
        "{nat}"
    );
    let fwd = h1.exec("ip6tables", &["-w", "-S", "FLANNEL-FWD"])?;
    assert!(
        fwd.contains("-d fd00:244::/56 -m comment --comment \"flanneld forward\" -j ACCEPT"),
        "{fwd}"
    );
    let v4nat = h1.exec("iptables", &["-w", "-t", "nat", "-S", "FLANNEL-POSTRTG"])?;
    assert!(v4nat.contains("10.244.0.0/16") && !v4nat.contains("fd00"), "{v4nat}");
    h1.exec("ip6tables", &["-w", "-t", "nat", "-F", "FLANNEL-POSTRTG"])?;
    l.wait_until("ip6tables masquerading put back", || {
        Ok(h1
            .exec("ip6tables", &["-w", "-t", "nat", "-S", "FLANNEL-POSTRTG"])?
            .contains("MASQUERADE"))
    })?;

    // A host whose lease goes is removed from the v6 device too.
    l.etcdctl(&["del", flannel_key])?;
    l.wait_until("flannel host's IPv6 route removed", || {
        Ok(!h1
            .ip(&["-6", "route", "show", "dev", "flannel-v6.1"])?
            .contains("fd00:244:0:c8::"))
    })?;
    a1.stop()?;
    a2.stop()?;
    Ok(())
}

#[test]
fn ipv6_only_network_over_an_ipv6_only_underlay() -> anyhow::Result<()> {
    let mut l = V6Lab::new(2, V6_ONLY_VXLAN, true)?;
    let a1 = l.start_agent(1, &[])?;
    let a2 = l.start_agent(2, &[])?;
    let leases = l.leases()?;
    assert_eq!(leases.len(), 2, "{leases:?}");
    for (i, agent) in [(1, &a1), (2, &a2)] {
        let v6: Ipv6Network = agent.ready["ipv6_subnet"].as_str().context("no ipv6_subnet")?.parse()?;
        let key = format!("0.0.0.0-0&{}-{}", v6.network(), v6.prefix());
        let lease = leases
            .get(&key)
            .with_context(|| format!("no lease {key} in {leases:?}"))?;
        assert_eq!(lease["PublicIP"], "0.0.0.0");
        assert_eq!(lease["PublicIPv6"], underlay_ipv6(i).to_string());
        assert_eq!(vtep_macs(lease).1, link_mac(l.host(i), "flannel-v6.1")?);
        assert!(l.host(i).ip(&["link", "show", "flannel.1"]).is_err(), "no IPv4 device");
        let file = std::fs::read_to_string(l.subnet_file(i))?;
        assert!(
            !file.contains("FLANNEL_SUBNET") && file.contains("FLANNEL_IPV6_SUBNET="),
            "{file}"
        );
    }
    for i in 1..=2 {
        l.add_container_from_subnet_file(i)?;
    }
    l.wait_until("each agent has the other as peer", || {
        Ok([1, 2].iter().all(|i| {
            l.host(*i)
                .ip(&["-6", "route", "show", "dev", "flannel-v6.1", "proto", "73"])
                .is_ok_and(|r| r.lines().count() == 1)
        }))
    })?;
    for (a, b) in [(1, 2), (2, 1)] {
        l.pings(a, l.container(b).ipv6.context("v6")?.into())?;
    }
    let (c1, c2) = (l.container(1), l.container(2));
    assert_eq!(
        tcp_transfer_verified(&c1.ns, &c2.ns, c2.ipv6.context("v6")?, 5203, 50 << 20)?,
        50 << 20
    );
    a1.stop()?;
    a2.stop()?;
    Ok(())
}

#[test]
fn host_gw_dual_stack_routes_ipv6_via_public_ipv6() -> anyhow::Result<()> {
    let mut l = V6Lab::new(2, DUAL_HOST_GW, false)?;
    let a1 = l.start_agent(1, &[])?;
    let a2 = l.start_agent(2, &[])?;
    for i in 1..=2 {
        l.add_container_from_subnet_file(i)?;
    }
    let v6_of_2 = a2.ready["ipv6_subnet"].as_str().context("no ipv6_subnet")?.to_string();
    l.wait_until("host 1 routes host 2's IPv6 subnet via its PublicIPv6", || {
        let routes = l.host(1).ip(&["-6", "route", "show", "proto", "73"])?;
        Ok(routes.contains(&format!("{v6_of_2} via {} dev eth0", underlay_ipv6(2))))
    })?;
    for (a, b) in [(1, 2), (2, 1)] {
        let to = l.container(b);
        l.pings(a, to.ipv4.context("v4")?.into())?;
        l.pings(a, to.ipv6.context("v6")?.into())?;
    }
    a1.stop()?;
    a2.stop()?;
    Ok(())
}

#[test]
fn udp_backend_with_ipv6_is_refused_naming_the_field() -> anyhow::Result<()> {
    let etcd = Etcd::start();
    let out = std::process::Command::new(workspace_bin("overlay"))
        .args([
            "config",
            "set",
            "--etcd-endpoints",
            &etcd.endpoint(),
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/56","Backend":{"Type":"udp"}}"#,
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {err}");
    assert!(err.contains("EnableIPv6") && err.contains("udp"), "{err}");
    Ok(())
}

#[test]
fn nftables_mode_has_flannels_ip6_table_and_puts_it_back() -> anyhow::Result<()> {
    let config = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/56","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#;
    let mut l = V6Lab::new(2, config, false)?;
    let a1 = l.start_agent(1, &["-iptables-resync=1"])?;
    let a2 = l.start_agent(2, &[])?;
    for i in 1..=2 {
        l.add_container_from_subnet_file(i)?;
    }
    let h1 = l.host(1);
    let table = h1.exec("nft", &["list", "table", "ip6", "flannel-ipv6"])?;
    let subnet = a1.ready["ipv6_subnet"].as_str().context("no ipv6_subnet")?;
    for rule in [
        format!("ip6 saddr {subnet} ip6 daddr fd00:244::/56 return"),
        "ip6 saddr fd00:244::/56 ip6 daddr != ff00::/8 masquerade".to_string(),
        "ip6 daddr fd00:244::/56 accept".to_string(),
    ] {
        assert!(table.contains(&rule), "{rule:?} missing from:\n{table}");
    }
    assert!(
        h1.exec("nft", &["list", "table", "ip", "flannel-ipv4"])?
            .contains("10.244.0.0/16")
    );
    h1.exec("nft", &["delete", "table", "ip6", "flannel-ipv6"])?;
    l.wait_until("the ip6 flannel-ipv6 table put back", || {
        Ok(h1
            .exec("nft", &["list", "table", "ip6", "flannel-ipv6"])
            .is_ok_and(|t| t.contains("masquerade")))
    })?;
    l.wait_until("host 1 has host 2 as peer", || {
        Ok(h1
            .ip(&["-6", "route", "show", "dev", "flannel-v6.1", "proto", "73"])?
            .lines()
            .count()
            == 1)
    })?;
    l.pings(1, l.container(2).ipv6.context("v6")?.into())?;
    a1.stop()?;
    a2.stop()?;
    Ok(())
}

/// Dual stack on our eBPF datapath (`--datapath=ebpf`, the last `-datapath` wins as in Go's
/// flag package): one overlay device carries both families, its MAC the VtepMAC of both
/// lease sides; IPv6 goes as VXLAN over IPv6 to a flannel-style host's `flannel-v6.1` as well
/// as between our agents. Pings of both families every way, 50 MB over IPv6 verified both to
/// our agent and to the flannel host, counters of the IPv6 datapath, a gone lease removed.
#[test]
fn dual_stack_vxlan_ebpf_datapath_with_a_flannel_style_host() -> anyhow::Result<()> {
    let mut l = V6Lab::new(3, DUAL_VXLAN, false)?;
    let (f_v4, f_v6): (Ipv4Network, Ipv6Network) = ("10.244.200.0/24".parse()?, "fd00:244:0:c8::/64".parse()?);
    let (f_mac, f_mac6) = ("0e:f1:00:00:00:03", "0e:f1:00:00:06:03");
    let f_ip = l.lab.host(3).public_ip;
    flannel_vxlan_host(l.host(3), "eth0", f_ip, f_v4, f_mac, 1500)?;
    let f = l.host(3);
    let local6 = underlay_ipv6(3).to_string();
    f.ip(&[
        "link", "add", "flannel-v6.1", "address", f_mac6, "type", "vxlan", "id", "1", "local", &local6, "dev", "eth0",
        "dstport", "8472", "nolearning",
    ])?;
    f.ip(&["link", "set", "flannel-v6.1", "mtu", "1430", "up"])?;
    f.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/128", f_v6.network()),
        "dev",
        "flannel-v6.1",
    ])?;
    let grant = l.etcdctl(&["lease", "grant", "600"])?;
    let lease_id = grant
        .split_whitespace()
        .nth(1)
        .context("lease grant output")?
        .to_string();
    let flannel_key = "/coreos.com/network/subnets/10.244.200.0-24&fd00:244:0:c8::-64";
    let flannel_value = format!(
        r#"{{"PublicIP":"{f_ip}","PublicIPv6":"{local6}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{f_mac}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{f_mac6}"}}}}"#
    );
    l.etcdctl(&["put", "--lease", &lease_id, flannel_key, &flannel_value])?;

    let agents = [
        l.start_agent(1, &["--datapath=ebpf"])?,
        l.start_agent(2, &["--datapath=ebpf"])?,
    ];
    for (i, agent) in [(1, &agents[0]), (2, &agents[1])] {
        let lease = ready_lease(agent)?;
        assert_eq!(lease["PublicIPv6"], underlay_ipv6(i).to_string(), "{lease}");
        let (mac4, mac6) = vtep_macs(&lease);
        let ours = link_mac(l.host(i), "ovl0")?;
        assert_eq!(
            (mac4.as_str(), mac6.as_str()),
            (ours.as_str(), ours.as_str()),
            "{lease}"
        );
        assert!(
            !l.host(i).ip(&["link", "show"])?.contains("flannel"),
            "no kernel devices on host{i}"
        );
        // The flannel host learns our lease as flanneld would.
        let v4: Ipv4Network = agent.ready["subnet"].as_str().unwrap_or_default().parse()?;
        flannel_vxlan_add_peer(l.host(3), v4, l.lab.host(i).public_ip, &mac4)?;
        let v6: Ipv6Network = agent.ready["ipv6_subnet"].as_str().unwrap_or_default().parse()?;
        let gw = v6.network().to_string();
        let f = l.host(3);
        f.ip(&[
            "-6", "neigh", "replace", &gw, "lladdr", &mac6, "dev", "flannel-v6.1", "nud", "permanent",
        ])?;
        run(f.command("bridge").args([
            "fdb",
            "append",
            &mac6,
            "dev",
            "flannel-v6.1",
            "dst",
            &underlay_ipv6(i).to_string(),
        ]))?;
        f.ip(&[
            "-6",
            "route",
            "replace",
            &v6.to_string(),
            "via",
            &gw,
            "dev",
            "flannel-v6.1",
            "onlink",
        ])?;
        // Our overlay device routes the IPv6 network with room for VXLAN over IPv6.
        let route = l.host(i).ip(&["-6", "route", "show", "fd00:244::/56"])?;
        assert!(
            route.contains("dev ovl0") && route.contains("mtu 1430"),
            "host{i}: {route}"
        );
    }
    for i in 1..=2 {
        l.add_container_from_subnet_file(i)?;
    }
    l.add_container(
        3,
        Some(Ipv4Network::new(Ipv4Addr::new(10, 244, 200, 1), 24)?),
        Some(Ipv6Network::new(Ipv6Addr::from(u128::from(f_v6.network()) + 1), 64)?),
        "1450",
    )?;
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)] {
        let to = l.container(b);
        l.pings(a, to.ipv4.context("v4")?.into())?;
        l.pings(a, to.ipv6.context("v6")?.into())?;
    }
    let (c1, c2, c3) = (l.container(1), l.container(2), l.container(3));
    let verified = tcp_transfer_verified(&c1.ns, &c2.ns, c2.ipv6.context("v6")?, 5201, 50 << 20)?;
    assert_eq!(verified, 50 << 20);
    let verified = tcp_transfer_verified(&c2.ns, &c3.ns, c3.ipv6.context("v6")?, 5202, 50 << 20)?;
    assert_eq!(verified, 50 << 20);
    let verified = tcp_transfer_verified(&c3.ns, &c1.ns, c1.ipv6.context("v6")?, 5203, 10 << 20)?;
    assert_eq!(verified, 10 << 20);

    // A host whose lease goes is dropped from the IPv6 peer table: its traffic is refused.
    l.etcdctl(&["del", flannel_key])?;
    l.wait_until("flannel host's IPv6 peer removed", || {
        let r = ping(
            &l.container(3).ns,
            l.container(1).ipv6.context("v6")?,
            1,
            56,
            false,
            "0.2",
        )?;
        Ok(r.received == 0)
    })?;
    let s1 = agents[0].counters()?;
    let [a1, a2] = agents;
    a1.stop()?;
    a2.stop()?;
    let packets = |name: &str| s1["counters"][name]["packets"].as_u64().unwrap_or(0);
    assert!(packets("encap_vxlan6") > 0 && packets("decap_vxlan6") > 0, "{s1}");
    assert!(
        packets("drop_unknown_peer") > 0,
        "the gone host's packets refused: {s1}"
    );
    Ok(())
}

/// ping output (stdout and stderr) of DF pings of `size` bytes that may fail.
fn ping_text(ns: &Netns, dst: Ipv6Addr, size: u32) -> anyhow::Result<String> {
    let size = size.to_string();
    let dst = dst.to_string();
    let out = ns
        .command("ping")
        .args(["-n", "-c", "2", "-i", "0.2", "-W", "1", "-M", "do", "-s", &size, &dst])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

/// An IPv6-only network (`EnableIPv4: false`) over an IPv6-only underlay on our eBPF datapath,
/// the agents started as a flannel unit starts them (`--datapath` left at auto): the lease as
/// flannel writes it (PublicIP 0.0.0.0, no BackendData, BackendV6Data with our device's MAC),
/// `ovl0` with only the IPv6 subnet's address and route, `/status` saying eBPF and why host
/// routing is off; pings both ways, "packet too big" at the MTU edge, 50 MB checked byte for
/// byte and carried by the programs (their counters); and a third host on the kernel fallback
/// (`--datapath=kernel`: flannel's `flannel-v6.1`) in the same network, reached both ways.
#[test]
fn ipv6_only_network_on_the_ebpf_datapath_with_a_kernel_host() -> anyhow::Result<()> {
    const MTU6: u32 = 1430;
    let mut l = V6Lab::new(3, V6_ONLY_VXLAN, true)?;
    // Host 1 as the unit starts it (`auto` picks eBPF); host 2 asks for eBPF, with XDP decap.
    let agents = [
        l.start_flannel_unit(1, &[])?,
        l.start_flannel_unit(2, &["--datapath=ebpf", "-decap=xdp"])?,
    ];
    let kernel_host = l.start_agent(3, &[])?;
    let leases = l.leases()?;
    assert_eq!(leases.len(), 3, "{leases:?}");
    for (i, agent) in [(1, &agents[0]), (2, &agents[1])] {
        let backend = agent.ready["backend"].as_str().unwrap_or_default();
        assert!(backend.starts_with("ebpf-vxlan"), "host{i}: {backend}");
        let v6: Ipv6Network = agent.ready["ipv6_subnet"].as_str().context("no ipv6_subnet")?.parse()?;
        let key = format!("0.0.0.0-0&{}-{}", v6.network(), v6.prefix());
        let lease = leases
            .get(&key)
            .with_context(|| format!("no lease {key} in {leases:?}"))?;
        assert_eq!(lease["PublicIP"], "0.0.0.0", "{lease}");
        assert_eq!(lease["PublicIPv6"], underlay_ipv6(i).to_string(), "{lease}");
        assert_eq!(lease["BackendType"], "vxlan", "{lease}");
        assert!(lease.get("BackendData").is_none_or(|d| d.is_null()), "{lease}");
        assert_eq!(lease["BackendV6Data"]["VNI"], 1, "{lease}");
        assert_eq!(vtep_macs(lease).1, link_mac(l.host(i), "ovl0")?, "{lease}");
        let h = l.host(i);
        assert!(
            h.ip(&["link", "show", "flannel-v6.1"]).is_err(),
            "host{i}: a kernel device"
        );
        assert_eq!(
            h.ip(&["-4", "addr", "show", "dev", "ovl0"])?.trim(),
            "",
            "host{i}: IPv4 on ovl0"
        );
        let addr6 = h.ip(&["-6", "addr", "show", "dev", "ovl0"])?;
        assert!(addr6.contains(&format!("{}/128", v6.network())), "host{i}: {addr6}");
        assert_eq!(h.ip(&["-4", "route", "show", "dev", "ovl0"])?.trim(), "", "host{i}");
        let route = h.ip(&["-6", "route", "show", "fd00:10::/56"])?;
        assert!(
            route.contains("dev ovl0") && route.contains(&format!("mtu {MTU6}")),
            "host{i}: {route}"
        );
        let file = std::fs::read_to_string(l.subnet_file(i))?;
        assert!(
            !file.contains("FLANNEL_SUBNET=")
                && !file.contains("FLANNEL_NETWORK=")
                && file.contains(&format!("FLANNEL_MTU={MTU6}\n"))
                && file.contains("FLANNEL_IPV6_NETWORK=fd00:10::/56\n")
                && file.contains(&format!(
                    "FLANNEL_IPV6_SUBNET={}/64\n",
                    Ipv6Addr::from(u128::from(v6.network()) + 1)
                )),
            "host{i}: {file}"
        );
    }
    // `overlay leases` shows an IPv6-only lease by its IPv6 side.
    let table = l.on_switch(&["leases", "--etcd-endpoints", &l.etcd.endpoint()])?;
    let v6_of_1 = agents[0].ready["ipv6_subnet"].as_str().unwrap_or_default();
    let row = table
        .lines()
        .find(|r| r.contains(v6_of_1))
        .with_context(|| format!("no row for {v6_of_1}:\n{table}"))?;
    assert!(
        row.starts_with("- ")
            && row.contains(&underlay_ipv6(1).to_string())
            && row.contains(&link_mac(l.host(1), "ovl0")?)
            && !row.contains("0.0.0.0"),
        "{table}"
    );
    let kernel_lease = ready_lease(&kernel_host)?;
    assert!(
        kernel_host.ready["backend"]
            .as_str()
            .unwrap_or_default()
            .contains("flannel-v6.1"),
        "{}",
        kernel_host.ready
    );
    assert!(
        kernel_lease.get("BackendData").is_none_or(|d| d.is_null()),
        "{kernel_lease}"
    );

    for i in 1..=3 {
        l.add_container_from_subnet_file(i)?;
    }
    l.wait_until("every host has the other two as peers", || {
        Ok([1, 2, 3].iter().all(|i| {
            l.status(*i).is_ok_and(|s| {
                s["peers"].as_array().is_some_and(|p| p.len() == 2) && s["unapplied_peers"] == serde_json::json!([])
            })
        }))
    })?;
    for i in 1..=2 {
        let status = l.status(i)?;
        let backend = status["backend"].as_str().unwrap_or_default();
        assert!(
            backend.starts_with("ebpf-vxlan") && backend.contains("IPv4 only"),
            "host{i}: /status backend {backend}"
        );
        assert!(status["fallback"].is_null(), "host{i}: {status}");
        assert_eq!(status["ready"], true, "host{i}: {status}");
        assert!(
            status["public_ip"].as_str().unwrap_or_default().contains(':'),
            "{status}"
        );
        for peer in status["peers"].as_array().context("peers")? {
            let subnet: Ipv6Network = peer["subnet"].as_str().context("peer subnet")?.parse()?;
            assert_eq!(peer["ipv6_subnet"], subnet.to_string(), "{peer}");
            assert!(peer["vtep_mac_v6"].is_string(), "{peer}");
        }
    }
    let decap = l.status(2)?["backend"].as_str().unwrap_or_default().to_string();
    assert!(decap.contains("decap xdp"), "host2: {decap}");

    // Every pair both ways: ours to ours, ours to the kernel host and back.
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)] {
        l.pings(a, l.container(b).ipv6.context("v6")?.into())?;
    }

    // The largest DF packet that fits arrives whole; one byte more gets "packet too big" with
    // the overlay route's MTU from the sending host's stack.
    let (c1, c2) = (l.container(1), l.container(2));
    let to2 = c2.ipv6.context("v6")?;
    let fits = MTU6 - 48;
    let r = ping(&c1.ns, to2, 3, fits, true, "0.2")?;
    assert_eq!(r.received, 3, "{fits}-byte ping6: {r:?}");
    c1.ns.ip(&["link", "set", "eth0", "mtu", "1500"])?;
    let text = ping_text(&c1.ns, to2, fits + 1)?;
    c1.ns.ip(&["link", "set", "eth0", "mtu", &MTU6.to_string()])?;
    assert!(
        text.contains(&format!("mtu={MTU6}")) || text.contains(&format!("mtu = {MTU6}")),
        "an oversize ping6 should get packet too big with mtu {MTU6}: {text}"
    );

    let before = [agents[0].counters()?, agents[1].counters()?];
    assert_eq!(tcp_transfer_verified(&c1.ns, &c2.ns, to2, 5201, 50 << 20)?, 50 << 20);
    let to3 = l.container(3).ipv6.context("v6")?;
    assert_eq!(
        tcp_transfer_verified(&c2.ns, &l.container(3).ns, to3, 5202, 10 << 20)?,
        10 << 20
    );
    let to1 = c1.ipv6.context("v6")?;
    assert_eq!(
        tcp_transfer_verified(&l.container(3).ns, &c1.ns, to1, 5203, 10 << 20)?,
        10 << 20
    );
    let after = [agents[0].counters()?, agents[1].counters()?];
    let moved = |i: usize, name: &str| {
        let get = |v: &serde_json::Value| v["counters"][name]["bytes"].as_u64().unwrap_or(0);
        get(&after[i]) - get(&before[i])
    };
    eprintln!(
        "host1 encap_vxlan6 {} B, decap_vxlan6 {} B; host2 decap_vxlan6 {} B; {decap}",
        moved(0, "encap_vxlan6"),
        moved(0, "decap_vxlan6"),
        moved(1, "decap_vxlan6")
    );
    // The 50 MB from host 1 to host 2, wrapped by host 1's programs and unwrapped by host 2's.
    assert!(moved(0, "encap_vxlan6") >= 50 << 20, "host1: {}", after[0]);
    assert!(moved(1, "decap_vxlan6") >= 50 << 20, "host2: {}", after[1]);
    // The kernel host's 10 MB to host 1 came in through host 1's programs.
    assert!(moved(0, "decap_vxlan6") >= 10 << 20, "host1: {}", after[0]);
    // No IPv4 anywhere: nothing encapsulated or decapsulated as IPv4.
    for (i, c) in after.iter().enumerate() {
        for name in ["encap_vxlan", "decap_vxlan"] {
            assert_eq!(c["counters"][name]["packets"], 0, "host{}: {name}: {c}", i + 1);
        }
    }

    let [a1, a2] = agents;
    a1.stop()?;
    a2.stop()?;
    kernel_host.stop()?;
    Ok(())
}

/// host-gw in an IPv6-only network keeps the kernel's routes whatever `--datapath` says: our
/// eBPF host-gw is those routes plus host routing, which is IPv4 only. `/status` says so; the
/// routes go via each peer's PublicIPv6 and containers reach each other both ways.
#[test]
fn ipv6_only_host_gw_keeps_the_kernels_routes_and_says_why() -> anyhow::Result<()> {
    let config = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/56","Backend":{"Type":"host-gw"}}"#;
    let mut l = V6Lab::new(2, config, true)?;
    let a1 = l.start_flannel_unit(1, &[])?;
    let a2 = l.start_flannel_unit(2, &["--datapath=ebpf"])?;
    for i in 1..=2 {
        let status = l.status(i)?;
        let backend = status["backend"].as_str().unwrap_or_default();
        assert!(
            backend.contains("host-gw") && !backend.contains("ebpf"),
            "host{i}: {status}"
        );
        let why = status["fallback"].as_str().unwrap_or_default();
        assert!(
            why.contains("IPv6-only") && why.contains("IPv4 only"),
            "host{i}: {status}"
        );
    }
    for i in 1..=2 {
        l.add_container_from_subnet_file(i)?;
    }
    let v6_of_2 = a2.ready["ipv6_subnet"].as_str().context("no ipv6_subnet")?.to_string();
    l.wait_until("host 1 routes host 2's IPv6 subnet via its PublicIPv6", || {
        let routes = l.host(1).ip(&["-6", "route", "show", "proto", "73"])?;
        Ok(routes.contains(&format!("{v6_of_2} via {} dev eth0", underlay_ipv6(2))))
    })?;
    // The hosts resolve each other over the IPv6-only underlay first: now and then the first
    // neighbour solicitation here goes unanswered, and the kernel's next one comes a second
    // later, after the five pings below (nothing of ours is on that path with host-gw).
    for (a, b) in [(1, 2), (2, 1)] {
        let to = underlay_ipv6(b).to_string();
        l.wait_until("the hosts reach each other over the underlay", || {
            Ok(l.host(a).exec("ping", &["-n", "-c", "1", "-W", "1", &to]).is_ok())
        })?;
    }
    for (a, b) in [(1, 2), (2, 1)] {
        l.pings(a, l.container(b).ipv6.context("v6")?.into())?;
    }
    // An underlay without IPv4 is what this network has, not a detached datapath: a changed
    // underlay (its MTU here) is followed, the backend programmed again, and the agent ready.
    l.host(1).ip(&["link", "set", "eth0", "mtu", "1480"])?;
    l.wait_until("host 1 follows its changed underlay", || {
        Ok(l.agent_get(1, "/metrics")?
            .contains("overlay_underlay_reattached_total 1"))
    })?;
    for i in 1..=2 {
        let status = l.status(i)?;
        assert_eq!(status["ready"], true, "host{i}: {status}");
    }
    l.pings(1, l.container(2).ipv6.context("v6")?.into())?;
    a1.stop()?;
    a2.stop()?;
    Ok(())
}

/// vxlan `DirectRouting` in a dual-stack network, as flannel does it per family: a peer whose
/// PublicIPv6 is on our link gets a route to its IPv6 subnet via that address (no
/// encapsulation), a peer behind a router keeps the tunnel. host1 reaches host3's PublicIPv6
/// through host2 as a router; host1 and host3 run the eBPF datapath, host2 the kernel's. Pings
/// of both families every way; host1's IPv6 encapsulation counter moves for host3 only.
#[test]
fn direct_routing_ipv6_on_the_same_link_only() -> anyhow::Result<()> {
    let mut l = V6Lab::new(3, DUAL_VXLAN_DIRECT, false)?;
    l.host(1).ip(&[
        "-6",
        "route",
        "add",
        &format!("{}/128", underlay_ipv6(3)),
        "via",
        &underlay_ipv6(2).to_string(),
        "dev",
        "eth0",
    ])?;
    let agents = [
        l.start_agent(1, &["--datapath=ebpf"])?,
        l.start_agent(2, &[])?,
        l.start_agent(3, &["--datapath=ebpf"])?,
    ];
    for a in &agents {
        let backend = a.ready["backend"].as_str().unwrap_or_default();
        assert!(backend.contains("DirectRouting"), "{backend}");
    }
    for i in 1..=3 {
        l.add_container_from_subnet_file(i)?;
    }
    let subnet6 = |i: usize| {
        agents[i - 1].ready["ipv6_subnet"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let route6 = |on: usize, to: usize| l.host(on).ip(&["-6", "route", "show", &subnet6(to)]);
    // Direct: host1 to host2 (eBPF), host2 to host1 (kernel datapath), host3 to host1 (host3
    // reaches host1 on the link, whatever host1's route back).
    for (on, to) in [(1, 2), (2, 1), (2, 3), (3, 1)] {
        let via = format!("via {} dev eth0", underlay_ipv6(to));
        l.wait_until(&format!("host{on} routes host{to}'s IPv6 subnet {via}"), || {
            Ok(route6(on, to)?.contains(&via))
        })?;
    }
    // host2's direct route took the place of its flannel-v6.1 route for host1.
    assert!(!route6(2, 1)?.contains("flannel-v6.1"), "{}", route6(2, 1)?);
    // Behind a gateway: host1 keeps the tunnel to host3 (our network route on ovl0).
    let container3 = l.container(3).ipv6.context("v6")?;
    let route = l.host(1).ip(&["-6", "route", "get", &container3.to_string()])?;
    assert!(
        route.contains("dev ovl0"),
        "host1 -> host3 is behind a gateway: {route}"
    );

    let encapsulated6 = |a: &OverlayProcess| -> anyhow::Result<u64> {
        Ok(a.counters()?["counters"]["encap_vxlan6"]["packets"]
            .as_u64()
            .unwrap_or(0))
    };
    let before = encapsulated6(&agents[0])?;
    l.pings(1, l.container(2).ipv6.context("v6")?.into())?;
    let after_direct = encapsulated6(&agents[0])?;
    assert_eq!(
        after_direct, before,
        "IPv6 packets to the peer on our link were encapsulated"
    );
    l.pings(1, container3.into())?;
    let after_gateway = encapsulated6(&agents[0])?;
    assert!(
        after_gateway >= after_direct + 5,
        "IPv6 to the peer behind a gateway was not encapsulated ({after_direct} -> {after_gateway})"
    );
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)] {
        let to = l.container(b);
        l.pings(a, to.ipv4.context("v4")?.into())?;
        l.pings(a, to.ipv6.context("v6")?.into())?;
    }
    // A gone peer's direct route goes with it.
    let [a1, a2, a3] = agents;
    let subnet2 = a2.ready["ipv6_subnet"].as_str().unwrap_or_default().to_string();
    a2.stop()?;
    let key = l
        .leases()?
        .into_keys()
        .find(|k| k.ends_with(&subnet2.replace('/', "-")))
        .context("host2's lease")?;
    l.etcdctl(&["del", &format!("/coreos.com/network/subnets/{key}")])?;
    l.wait_until("host1 removes the direct route to host2's IPv6 subnet", || {
        Ok(!l.host(1).ip(&["-6", "route", "show", &subnet2])?.contains("via"))
    })?;
    a1.stop()?;
    a3.stop()?;
    Ok(())
}
