//! IPv6 end to end: two hosts on a dual-stack underlay (IPv4 and IPv6 on one link), a container
//! behind a dual-stack bridge on each, `overlay datapath` carrying both families (IPv6 as VXLAN
//! over IPv6 between PublicIPv6s, as flannel's `flannel-v6.1`), real traffic. Both decap hooks;
//! interop with a host programmed as flannel programs its kernel `flannel-v6.1` device; and an
//! IPv6-only network (no IPv4 side, the underlay without IPv4 addresses).
use std::{net::Ipv6Addr, time::Duration};

use overlay_tests::{
    lab::{self, Backend, Host, OverlayProcess},
    netns::Netns,
    traffic::{ping, tcp_transfer_verified},
};

const TRANSFER: u64 = 50 * 1024 * 1024;
const UNDERLAY_MTU: u32 = 1500;
/// What VXLAN over IPv6 leaves of the underlay MTU: the containers' MTU here (both families).
const MTU6: u32 = UNDERLAY_MTU - 70;

fn public6(index: usize) -> Ipv6Addr {
    format!("fc00::{index}").parse().unwrap()
}

fn subnet6(index: usize) -> String {
    format!("fd00:0:0:{index}::/64")
}

fn container6(index: usize) -> Ipv6Addr {
    format!("fd00:0:0:{index}::2").parse().unwrap()
}

/// The v6 side of a host: its PublicIPv6 on the underlay, its v6 subnet on docker0 (the
/// first address, docker's `--fixed-cidr-v6` gateway) and on its container.
fn add_ipv6(host: &Host) -> anyhow::Result<()> {
    let i = host.index;
    host.ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    host.ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/64", public6(i)),
        "dev",
        &host.iface,
        "nodad",
    ])?;
    host.ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("fd00:0:0:{i}::1/64"),
        "dev",
        "docker0",
        "nodad",
    ])?;
    for c in &host.containers {
        c.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", container6(i)),
            "dev",
            "eth0",
            "nodad",
        ])?;
        c.ns.ip(&["-6", "route", "add", "default", "via", &format!("fd00:0:0:{i}::1")])?;
        // A fresh bridge port's IPv6 takes a moment (the bridge's multicast snooping lets
        // neighbour solicitations through once the container has reported its groups): wait
        // until the host reaches its container, as a docker host would have by then.
        let start = std::time::Instant::now();
        while host
            .ns
            .exec("ping", &["-n", "-c", "1", "-W", "1", &container6(i).to_string()])
            .is_err()
        {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(10),
                "host{i} does not reach its container at {}",
                container6(i)
            );
        }
    }
    Ok(())
}

fn dual_stack_lab() -> anyhow::Result<lab::Lab> {
    let mut lab = lab::Lab::new(2, UNDERLAY_MTU)?;
    for h in lab.hosts.iter_mut() {
        h.add_containers(lab::static_subnet(h.index), MTU6, 1)?;
    }
    for h in &lab.hosts {
        add_ipv6(h)?;
    }
    Ok(lab)
}

/// `overlay datapath` on host `index`, both families, every other host as a peer of each.
fn start_dual_stack(lab: &lab::Lab, index: usize, decap: &str) -> anyhow::Result<OverlayProcess> {
    let mut args = lab::static_datapath_args(lab, index, Backend::Vxlan);
    args.extend(
        [
            "--decap",
            decap,
            "--public-ipv6",
            &public6(index).to_string(),
            "--subnet6",
            &subnet6(index),
            "--network6",
            "fd00::/48",
        ]
        .map(String::from),
    );
    for other in lab.hosts.iter().filter(|h| h.index != index) {
        args.push("--peer".into());
        args.push(format!(
            "{}={},{}",
            subnet6(other.index),
            public6(other.index),
            lab::static_vtep_mac(other.index)
        ));
    }
    OverlayProcess::start(&lab.host(index).ns, &args, Duration::from_secs(20))
}

fn counter(v: &serde_json::Value, name: &str) -> (u64, u64) {
    let c = &v["counters"][name];
    (c["packets"].as_u64().unwrap_or(0), c["bytes"].as_u64().unwrap_or(0))
}

/// ping output (stdout and stderr) for a DF ping of `size` bytes that may fail.
fn ping_text(ns: &Netns, dst: Ipv6Addr, size: u32) -> anyhow::Result<String> {
    let out = ns
        .command("ping")
        .args([
            "-n",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "1",
            "-M",
            "do",
            "-s",
            &size.to_string(),
        ])
        .arg(dst.to_string())
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

fn dual_stack_both_ways(hook: &str) -> anyhow::Result<()> {
    let lab = dual_stack_lab()?;
    let procs = [start_dual_stack(&lab, 1, hook)?, start_dual_stack(&lab, 2, hook)?];
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let (c1, c2) = (&h1.containers[0], &h2.containers[0]);

    // Both families, both ways.
    for (from, to, to6) in [(c1, c2, container6(2)), (c2, c1, container6(1))] {
        let r = ping(&from.ns, to6, 5, 56, false, "0.05")?;
        assert_eq!(r.received, 5, "{hook}: ping {to6}: {r:?}");
        let r = ping(&from.ns, to.ip, 5, 56, false, "0.05")?;
        assert_eq!(r.received, 5, "{hook}: ping {}: {r:?}", to.ip);
    }
    // The host's own traffic to a remote container takes the overlay (from the /128 on ovl0).
    let r = ping(&h1.ns, container6(2), 3, 56, false, "0.05")?;
    assert_eq!(r.received, 3, "{hook}: host1 -> {}: {r:?}", container6(2));

    // The largest DF packet that fits VXLAN over IPv6 arrives whole.
    let max_payload = MTU6 - 48;
    let r = ping(&c1.ns, container6(2), 3, max_payload, true, "0.05")?;
    assert_eq!(r.received, 3, "{hook}: {max_payload}-byte ping6: {r:?}");
    // One byte more from a container whose MTU lets it through: the host's route says 1430,
    // and the stack answers "packet too big" (IPv6 routers never fragment).
    c1.ns.ip(&["link", "set", "eth0", "mtu", "1500"])?;
    let text = ping_text(&c1.ns, container6(2), max_payload + 1)?;
    assert!(
        text.contains(&format!("mtu={MTU6}")) || text.contains(&format!("mtu = {MTU6}")),
        "{hook}: oversize ping6 should get packet-too-big with mtu {MTU6}, got: {text}"
    );
    c1.ns.ip(&["link", "set", "eth0", "mtu", &MTU6.to_string()])?;

    // Bulk TCP over IPv6 with every byte checked, both directions.
    assert_eq!(
        tcp_transfer_verified(&c1.ns, &c2.ns, container6(2), 5201, TRANSFER)?,
        TRANSFER
    );
    assert_eq!(
        tcp_transfer_verified(&c2.ns, &c1.ns, container6(1), 5202, TRANSFER / 5)?,
        TRANSFER / 5
    );

    // No peer owns fd00:0:0:99::/64: dropped on host1 and counted.
    let r = ping(&c1.ns, "fd00:0:0:99::2".parse::<Ipv6Addr>()?, 2, 56, false, "0.05")?;
    assert_eq!(r.received, 0);

    let [p1, p2] = procs;
    let (s1, s2) = (p1.stop()?, p2.stop()?);
    let (p, b) = counter(&s1, "encap_vxlan6");
    assert!(
        p > 0 && b >= TRANSFER,
        "{hook}: host1 encap_vxlan6 = {p} packets, {b} bytes"
    );
    let (p, b) = counter(&s2, "decap_vxlan6");
    assert!(
        p > 0 && b >= TRANSFER,
        "{hook}: host2 decap_vxlan6 = {p} packets, {b} bytes"
    );
    let (p, _) = counter(&s1, "encap_vxlan");
    assert!(p >= 5, "{hook}: host1 carried its IPv4 pings too: encap_vxlan = {p}");
    let (p, _) = counter(&s1, "drop_no_peer");
    assert!(p >= 2, "{hook}: host1 drop_no_peer = {p}");
    Ok(())
}

#[test]
fn dual_stack_tc_decap() {
    dual_stack_both_ways("tc").unwrap();
}

#[test]
fn dual_stack_xdp_decap() {
    dual_stack_both_ways("xdp").unwrap();
}

/// Host 2 programmed as flannel programs a dual-stack host's IPv6 side: a `flannel-v6.1` vxlan
/// device (VNI 1, port 8472, local PublicIPv6, nolearning, default checksums: udp6zerocsumtx
/// and udp6zerocsumrx off), its subnet's address as a /128, and per peer an onlink route via
/// the peer subnet's address, a permanent neighbour entry and an FDB entry. Host 1 runs ours.
#[test]
fn interop_with_flannel_v6_kernel_device() {
    let lab = dual_stack_lab().unwrap();
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let (mac1, mac2) = (lab::static_vtep_mac(1), lab::static_vtep_mac(2));
    let ns = &h2.ns;
    ns.ip(&[
        "link", "add", "flannel-v6.1", "address", &mac2, "type", "vxlan", "id", "1", "local", "fc00::2", "dev", "eth0",
        "dstport", "8472", "nolearning",
    ])
    .unwrap();
    ns.ip(&["link", "set", "flannel-v6.1", "mtu", &MTU6.to_string(), "up"])
        .unwrap();
    ns.ip(&["-6", "addr", "add", "fd00:0:0:2::/128", "dev", "flannel-v6.1", "nodad"])
        .unwrap();
    ns.ip(&[
        "-6", "neigh", "replace", "fd00:0:0:1::", "lladdr", &mac1, "dev", "flannel-v6.1", "nud", "permanent",
    ])
    .unwrap();
    overlay_tests::netns::run(
        ns.command("bridge")
            .args(["fdb", "append", &mac1, "dev", "flannel-v6.1", "dst", "fc00::1"]),
    )
    .unwrap();
    ns.ip(&[
        "-6",
        "route",
        "replace",
        &subnet6(1),
        "via",
        "fd00:0:0:1::",
        "dev",
        "flannel-v6.1",
        "onlink",
    ])
    .unwrap();

    let ours = start_dual_stack(&lab, 1, "tc").unwrap();
    let (c1, c2) = (&h1.containers[0], &h2.containers[0]);
    for (from, to) in [(c1, container6(2)), (c2, container6(1))] {
        let r = ping(&from.ns, to, 5, 56, false, "0.05").unwrap();
        assert_eq!(r.received, 5, "ping {to} between ours and flannel-v6.1: {r:?}");
    }
    // Full-size packets and bulk TCP both ways: the kernel device checks our UDP checksums
    // (it drops zero or wrong ones), we check nothing it would not.
    let r = ping(&c2.ns, container6(1), 3, MTU6 - 48, true, "0.05").unwrap();
    assert_eq!(r.received, 3, "full-size ping6 from the flannel host: {r:?}");
    let r = ping(&c1.ns, container6(2), 3, MTU6 - 48, true, "0.05").unwrap();
    assert_eq!(r.received, 3, "full-size ping6 to the flannel host: {r:?}");
    assert_eq!(
        tcp_transfer_verified(&c1.ns, &c2.ns, container6(2), 5203, TRANSFER / 5).unwrap(),
        TRANSFER / 5
    );
    assert_eq!(
        tcp_transfer_verified(&c2.ns, &c1.ns, container6(1), 5204, TRANSFER / 5).unwrap(),
        TRANSFER / 5
    );
    let s = ours.stop().unwrap();
    let (p, _) = counter(&s, "decap_vxlan6");
    assert!(p > 0, "decap_vxlan6 = {p}");
    // The kernel counts UDP checksum failures per namespace: none of ours may be among them.
    let snmp6 = ns.exec("cat", &["/proc/net/snmp6"]).unwrap();
    let csum_errors = snmp6
        .lines()
        .find_map(|l| l.strip_prefix("Udp6InCsumErrors"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert_eq!(
        csum_errors,
        Some(0),
        "UDP checksum errors on the flannel host:\n{snmp6}"
    );
}

/// `overlay datapath` for an IPv6-only network on host `index`: no --public-ip, no --subnet,
/// no IPv4 peers.
fn ipv6_only_args(lab: &lab::Lab, index: usize, decap: &str) -> Vec<String> {
    let host = lab.host(index);
    let mut args: Vec<String> = [
        "datapath",
        "--iface",
        &host.iface,
        "--vtep-mac",
        &lab::static_vtep_mac(index),
        "--decap",
        decap,
        "--public-ipv6",
        &public6(index).to_string(),
        "--subnet6",
        &subnet6(index),
        "--network6",
        "fd00::/48",
    ]
    .map(String::from)
    .to_vec();
    for other in lab.hosts.iter().filter(|h| h.index != index) {
        args.push("--peer".into());
        args.push(format!(
            "{}={},{}",
            subnet6(other.index),
            public6(other.index),
            lab::static_vtep_mac(other.index)
        ));
    }
    args
}

/// An IPv6-only network with static peers: the underlay's IPv4 addresses gone, `overlay
/// datapath` given only its IPv6 side (TC decap on host 1, XDP on host 2). ovl0 holds no IPv4,
/// pings and 20 MB of TCP go both ways, the largest DF packet fits and one byte more gets
/// "packet too big", and only the IPv6 counters move. An IPv4 peer without an IPv4 side, and
/// no side at all, are refused naming the flags.
#[test]
fn ipv6_only_static_peers() {
    let lab = dual_stack_lab().unwrap();
    for h in &lab.hosts {
        h.ns.ip(&["-4", "addr", "flush", "dev", &h.iface]).unwrap();
    }
    let procs = [
        OverlayProcess::start(&lab.host(1).ns, &ipv6_only_args(&lab, 1, "tc"), Duration::from_secs(20)).unwrap(),
        OverlayProcess::start(
            &lab.host(2).ns,
            &ipv6_only_args(&lab, 2, "xdp"),
            Duration::from_secs(20),
        )
        .unwrap(),
    ];
    assert_eq!(procs[0].ready["mtu"], MTU6, "{}", procs[0].ready);
    let host_routing = procs[0].ready["host_routing"].as_str().unwrap_or_default();
    assert!(host_routing.contains("IPv4 only"), "{host_routing}");
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    for h in [h1, h2] {
        assert_eq!(h.ns.ip(&["-4", "addr", "show", "dev", "ovl0"]).unwrap().trim(), "");
        let route = h.ns.ip(&["-6", "route", "show", "fd00::/48"]).unwrap();
        assert!(
            route.contains("dev ovl0") && route.contains(&format!("mtu {MTU6}")),
            "{route}"
        );
    }
    let (c1, c2) = (&h1.containers[0], &h2.containers[0]);
    for (from, to6) in [(c1, container6(2)), (c2, container6(1))] {
        let r = ping(&from.ns, to6, 5, 56, false, "0.05").unwrap();
        assert_eq!(r.received, 5, "ping {to6}: {r:?}");
    }
    let max_payload = MTU6 - 48;
    let r = ping(&c2.ns, container6(1), 3, max_payload, true, "0.05").unwrap();
    assert_eq!(r.received, 3, "{max_payload}-byte ping6: {r:?}");
    c1.ns.ip(&["link", "set", "eth0", "mtu", "1500"]).unwrap();
    let text = ping_text(&c1.ns, container6(2), max_payload + 1).unwrap();
    c1.ns.ip(&["link", "set", "eth0", "mtu", &MTU6.to_string()]).unwrap();
    assert!(
        text.contains(&format!("mtu={MTU6}")) || text.contains(&format!("mtu = {MTU6}")),
        "packet too big with mtu {MTU6} expected: {text}"
    );
    assert_eq!(
        tcp_transfer_verified(&c1.ns, &c2.ns, container6(2), 5205, TRANSFER / 5).unwrap(),
        TRANSFER / 5
    );
    assert_eq!(
        tcp_transfer_verified(&c2.ns, &c1.ns, container6(1), 5206, TRANSFER / 5).unwrap(),
        TRANSFER / 5
    );
    let [p1, p2] = procs;
    let (s1, s2) = (p1.stop().unwrap(), p2.stop().unwrap());
    for (s, other) in [(&s1, &s2), (&s2, &s1)] {
        let (p, b) = counter(s, "encap_vxlan6");
        assert!(p > 0 && b >= TRANSFER / 5, "encap_vxlan6 = {p} packets, {b} bytes: {s}");
        let (p, b) = counter(other, "decap_vxlan6");
        assert!(
            p > 0 && b >= TRANSFER / 5,
            "decap_vxlan6 = {p} packets, {b} bytes: {other}"
        );
        for name in ["encap_vxlan", "decap_vxlan"] {
            assert_eq!(counter(s, name).0, 0, "{name}: {s}");
        }
    }

    // Refused before anything is set up, naming what is missing.
    let refused = |args: &[&str]| {
        let out = lab
            .host(1)
            .ns
            .command(lab::workspace_bin("overlay").to_str().unwrap())
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let v6 = [
        "datapath", "--iface", "eth0", "--public-ipv6", "fc00::1", "--subnet6", "fd00:0:0:1::/64",
    ];
    let err = refused(&[&v6[..], &["--peer", "10.244.2.0/24=192.168.0.2,02:00:00:00:00:02"]].concat());
    assert!(err.contains("--public-ip") && err.contains("10.244.2.0/24"), "{err}");
    let err = refused(&["datapath", "--iface", "eth0"]);
    assert!(err.contains("--public-ip") && err.contains("--public-ipv6"), "{err}");
    let err = refused(&[&v6[..], &["--backend", "udp"]].concat());
    assert!(err.contains("udp") && err.contains("IPv6"), "{err}");
    assert!(
        h1.ns.ip(&["link", "show", "ovl0"]).is_err(),
        "a refused start left ovl0"
    );
}
