//! `overlay agent` end to end: etcd on the underlay switch, an agent per host, containers built
//! from the subnet file, real traffic.
use std::time::{Duration, Instant};

use overlay_tests::{
    cluster::Cluster,
    lab::OverlayProcess,
    traffic::{ping, tcp_transfer_verified},
};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
const UDP: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}"#;
const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}"#;

/// Every container pings every container on the other hosts.
fn all_pairs_reachable(c: &Cluster) -> anyhow::Result<()> {
    for a in &c.lab.hosts {
        for b in c.lab.hosts.iter().filter(|b| b.index != a.index) {
            for ca in &a.containers {
                for cb in &b.containers {
                    let r = ping(&ca.ns, cb.ip, 3, 56, false, "0.05")?;
                    anyhow::ensure!(
                        r.received == 3,
                        "host{} {} -> host{} {}: {r:?}",
                        a.index,
                        ca.ip,
                        b.index,
                        cb.ip
                    );
                }
            }
        }
    }
    Ok(())
}

fn start_all(c: &mut Cluster, extra: &[&str]) -> anyhow::Result<Vec<OverlayProcess>> {
    let mut agents = Vec::new();
    for i in 1..=c.lab.hosts.len() {
        let a = c.start_agent(i, extra)?;
        c.add_containers(i, &a, 1)?;
        agents.push(a);
    }
    Ok(agents)
}

fn counter(v: &serde_json::Value, name: &str) -> u64 {
    v["counters"][name]["packets"].as_u64().unwrap_or(0)
}

#[test]
fn vxlan_three_agents_then_a_fourth_joins_and_one_leaves() -> anyhow::Result<()> {
    let mut c = Cluster::new(3, VXLAN)?;
    let mut agents = start_all(&mut c, &[])?;
    // Subnets are distinct and the leases carry flannel's vxlan data.
    let subnets: std::collections::BTreeSet<_> = agents.iter().map(|a| a.ready["subnet"].to_string()).collect();
    assert_eq!(subnets.len(), 3);
    for a in &agents {
        let lease: serde_json::Value = serde_json::from_str(a.ready["lease"].as_str().unwrap())?;
        assert_eq!(lease["BackendType"], "vxlan");
        assert_eq!(lease["BackendData"]["VNI"], 1);
        assert!(lease["BackendData"]["VtepMAC"].as_str().unwrap().len() == 17, "{lease}");
    }
    c.wait_full_mesh(3, Duration::from_secs(10))?;
    all_pairs_reachable(&c)?;

    // The agent follows docker0 on its tick: frames into host1's container go straight to the
    // container, by host routing (the default) or, without it, from the bridge straight to the
    // container's port (decapsulated TCP would otherwise be segmented in software). Pings until
    // its copy of the bridge has the container (no bulk traffic meanwhile: the other tests
    // share the CPUs' backlog queues), then one verified transfer.
    let (h1, h2) = (c.lab.host(1), c.lab.host(2));
    let direct = ["bridge_redirect", "shortcut_to_container"];
    c.wait_until(
        "host1's agent hands frames straight to the container",
        Duration::from_secs(10),
        || {
            ping(&h2.containers[0].ns, h1.containers[0].ip, 1, 56, false, "0.05")?;
            let v = agents[0].counters()?;
            Ok(direct.iter().map(|name| counter(&v, name)).sum::<u64>() > 0)
        },
    )?;
    let bytes = |a: &OverlayProcess| -> anyhow::Result<u64> {
        let v = a.counters()?;
        Ok(direct
            .iter()
            .map(|name| v["counters"][name]["bytes"].as_u64().unwrap_or(0))
            .sum())
    };
    let before = bytes(&agents[0])?;
    let n = tcp_transfer_verified(
        &h2.containers[0].ns,
        &h1.containers[0].ns,
        h1.containers[0].ip,
        5401,
        1 << 20,
    )?;
    assert_eq!(n, 1 << 20);
    let redirected = bytes(&agents[0])? - before;
    assert!(redirected >= 1 << 20, "{redirected} bytes redirected for 1 MiB sent");

    // A fourth host joins: the others must reach it within a second of its lease.
    let i4 = c.lab.add_host()?;
    let a4 = c.start_agent(i4, &[])?;
    let leased = Instant::now();
    c.add_containers(i4, &a4, 1)?;
    let c4 = c.lab.host(i4).containers[0].ip;
    let joined = c.wait_until("host1 reaches the new host's container", Duration::from_secs(5), || {
        Ok(ping(&c.lab.host(1).containers[0].ns, c4, 1, 56, false, "0.05")?.received == 1)
    })?;
    println!(
        "fourth host reachable {:?} after its agent was ready",
        leased.elapsed().min(joined)
    );
    assert!(leased.elapsed() < Duration::from_secs(5));
    agents.push(a4);
    all_pairs_reachable(&c)?;

    // Host 2's lease is deleted from etcd: its agent stops, as flanneld does, and the others
    // remove it from their datapath.
    let s2 = agents[1].ready["subnet"].as_str().unwrap().replace('/', "-");
    c.etcdctl(&["del", &format!("/coreos.com/network/subnets/{s2}")])?;
    let gone = agents[1].ready["subnet"].as_str().unwrap().to_string();
    c.wait_until("host1 forgets host2's subnet", Duration::from_secs(5), || {
        Ok(!c.peer_subnets(1)?.contains(&gone))
    })?;
    c.wait_until(
        "host2's agent stops on losing its lease",
        Duration::from_secs(5),
        || Ok(agents[1].try_wait().is_some()),
    )?;
    let c2 = c.lab.host(2).containers[0].ip;
    let r = ping(&c.lab.host(1).containers[0].ns, c2, 2, 56, false, "0.05")?;
    assert_eq!(
        r.received, 0,
        "host2's subnet must be unreachable once its lease is gone"
    );
    let stats = agents.remove(0).stop()?;
    assert!(counter(&stats, "drop_no_peer") >= 2, "{stats}");
    assert!(
        counter(&stats, "encap_vxlan") > 0 && counter(&stats, "decap_vxlan") > 0,
        "{stats}"
    );
    Ok(())
}

#[test]
fn udp_and_host_gw_three_agents() -> anyhow::Result<()> {
    for config in [UDP, HOST_GW] {
        let mut c = Cluster::new(3, config)?;
        let agents = start_all(&mut c, &[])?;
        let mtu = if config == UDP { 1472 } else { 1500 };
        for a in &agents {
            assert_eq!(a.ready["mtu"], mtu, "{config}");
            let lease: serde_json::Value = serde_json::from_str(a.ready["lease"].as_str().unwrap())?;
            if config == UDP {
                assert!(
                    lease.get("BackendType").is_none(),
                    "flannel's udp leases have no BackendType: {lease}"
                );
            } else {
                assert_eq!(lease["BackendType"], "host-gw");
            }
        }
        c.wait_full_mesh(3, Duration::from_secs(10))?;
        all_pairs_reachable(&c)?;
        let (h1, h2) = (c.lab.host(1), c.lab.host(2));
        let n = tcp_transfer_verified(
            &h1.containers[0].ns,
            &h2.containers[0].ns,
            h2.containers[0].ip,
            5400,
            5 << 20,
        )?;
        assert_eq!(n, 5 << 20);
    }
    Ok(())
}

/// flannel's own datapaths in the same network as ours: the kernel vxlan device programmed as
/// flannel's vxlan backend does, and flannel's udp design (TUN + userspace forwarder).
#[test]
fn mixed_with_flannel_kernel_datapaths() -> anyhow::Result<()> {
    for (config, device) in [(VXLAN, "flannel.1"), (UDP, "flannel0")] {
        let mut c = Cluster::new(3, config)?;
        if device == "flannel0" {
            // A veth hands the receiver our inner TCP checksum unfinished (offload state rides
            // along); the kernel datapaths cope, a userspace receiver like flannel's udp
            // forwarder writes it to its TUN as is. Physical NICs finish it on the wire, and so
            // does a veth without tx offload: make the lab's links behave like wires here.
            for h in &c.lab.hosts {
                h.ns.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
            }
        }
        let a1 = c.start_agent(1, &["--datapath=kernel"])?;
        c.add_containers(1, &a1, 1)?;
        let a2 = c.start_agent(2, &[])?;
        c.add_containers(2, &a2, 1)?;
        let a3 = c.start_agent(3, &[])?;
        c.add_containers(3, &a3, 1)?;
        assert!(
            c.lab.host(1).ns.ip(&["link", "show", device]).is_ok(),
            "host1 should run {device}"
        );
        assert!(
            c.lab.host(2).ns.ip(&["link", "show", "ovl0"]).is_ok(),
            "host2 should run our datapath"
        );
        c.wait_full_mesh(3, Duration::from_secs(10))?;
        all_pairs_reachable(&c)?;
        let (h1, h2) = (c.lab.host(1), c.lab.host(2));
        let n = tcp_transfer_verified(
            &h2.containers[0].ns,
            &h1.containers[0].ns,
            h1.containers[0].ip,
            5500,
            5 << 20,
        )?;
        assert_eq!(n, 5 << 20);
        drop((a1, a2, a3));
    }
    Ok(())
}

#[test]
fn restart_keeps_traffic_and_subnet() -> anyhow::Result<()> {
    let mut c = Cluster::new(2, VXLAN)?;
    let mut agents = start_all(&mut c, &[])?;
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    let subnet = agents[0].ready["subnet"].clone();

    // 150 pings 20 ms apart (3 s) across host1's agent restart.
    let from = c.lab.host(2).containers[0].ns.name().to_string();
    let to = c.lab.host(1).containers[0].ip;
    let pinger = std::thread::spawn(move || {
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &from, "ping", "-n", "-c", "150", "-i", "0.02", "-W", "1",
            ])
            .arg(to.to_string())
            .output()
            .expect("ping");
        overlay_tests::traffic::parse_ping(&String::from_utf8_lossy(&out.stdout))
    });
    std::thread::sleep(Duration::from_millis(500));
    agents.remove(0).stop()?;
    // The datapath stays while no agent runs.
    assert!(c.lab.host(1).ns.ip(&["link", "show", "ovl0"]).is_ok());
    let restarted = c.start_agent(1, &[])?;
    let r = pinger.join().expect("pinger")?;
    assert_eq!(r.transmitted, 150);
    assert_eq!(r.received, 150, "pings lost across the agent restart: {r:?}");
    assert_eq!(
        restarted.ready["subnet"], subnet,
        "the restarted agent keeps its subnet"
    );
    assert!(
        restarted.ready["backend"].as_str().unwrap().contains("adopted"),
        "{}",
        restarted.ready
    );

    // --cleanup removes what the agent installed.
    drop(restarted);
    let args = c.agent_args(1, &["--cleanup"])?;
    let bin = overlay_tests::lab::workspace_bin("overlay");
    overlay_tests::netns::run(c.lab.host(1).ns.command(bin.to_str().unwrap()).args(&args))?;
    assert!(
        c.lab.host(1).ns.ip(&["link", "show", "ovl0"]).is_err(),
        "overlay device left after --cleanup"
    );
    assert!(!c.subnet_file(1).exists(), "subnet file left after --cleanup");
    let link = c.lab.host(1).ns.ip(&["-d", "link", "show", "eth0"])?;
    assert!(!link.contains("xdp"), "XDP left after --cleanup: {link}");
    let rules = c.lab.host(1).ns.exec("iptables", &["-S", "FORWARD"])?;
    assert!(
        !rules.contains("FLANNEL"),
        "iptables rules left after --cleanup: {rules}"
    );
    Ok(())
}

#[test]
fn etcd_outage_keeps_traffic_then_a_new_host_joins() -> anyhow::Result<()> {
    let mut c = Cluster::new(3, VXLAN)?;
    let agents: Vec<_> = (1..=2)
        .map(|i| {
            let a = c.start_agent(i, &[])?;
            c.add_containers(i, &a, 1)?;
            Ok(a)
        })
        .collect::<anyhow::Result<_>>()?;
    c.wait_full_mesh(2, Duration::from_secs(10))?;

    c.etcd.stop();
    let down = Instant::now();
    let (h1, h2) = (c.lab.host(1), c.lab.host(2));
    while down.elapsed() < Duration::from_secs(15) {
        let r = ping(&h1.containers[0].ns, h2.containers[0].ip, 5, 56, false, "0.1")?;
        assert_eq!(
            r.received, 5,
            "traffic between existing peers must go on while etcd is down"
        );
    }
    let n = tcp_transfer_verified(
        &h1.containers[0].ns,
        &h2.containers[0].ns,
        h2.containers[0].ip,
        5600,
        5 << 20,
    )?;
    assert_eq!(n, 5 << 20);
    c.etcd.restart();

    let a3 = c.start_agent(3, &[])?;
    c.add_containers(3, &a3, 1)?;
    c.wait_until("host1 learns host3 after etcd is back", Duration::from_secs(15), || {
        Ok(c.peer_subnets(1)?.len() == 2)
    })?;
    all_pairs_reachable(&c)?;
    // The re-list that brought host3 may come a moment before the new watch is counted.
    c.wait_until(
        "the etcd reconnect is counted in /metrics",
        Duration::from_secs(3),
        || {
            let metrics = c.agent_get(1, "/metrics")?;
            let reconnects: u64 = metrics
                .lines()
                .find_map(|l| l.strip_prefix("overlay_etcd_reconnects_total "))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            Ok(reconnects >= 1)
        },
    )?;
    drop(agents);
    Ok(())
}

/// Unit files from the guides pass flanneld's flags with one dash, and environment files set
/// FLANNELD_* variables: both must work.
#[test]
fn go_style_flags_environment_and_health_endpoints() -> anyhow::Result<()> {
    let mut c = Cluster::new(2, VXLAN)?;
    let pin = c.pin_dir(1)?;
    let args: Vec<String> = vec![
        "agent".into(),
        format!("-etcd-endpoints={}", c.endpoint()),
        "-etcd-prefix=/coreos.com/network".into(),
        format!("-subnet-file={}", c.subnet_file(1).display()),
        format!("-pin-dir={}", pin.display()),
        "-ip-masq".into(),
        "-healthz-ip=127.0.0.1".into(),
        format!("-healthz-port={}", overlay_tests::cluster::HEALTHZ_PORT),
    ];
    let a1 = OverlayProcess::start_env(
        &c.lab.host(1).ns,
        &args,
        &[("FLANNELD_IFACE", "eth0"), ("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "30")],
        Duration::from_secs(30),
    )?;
    c.add_containers(1, &a1, 1)?;
    let env = std::fs::read_to_string(c.subnet_file(1))?;
    assert!(env.contains("FLANNEL_IPMASQ=true"), "{env}");
    let nat = c.lab.host(1).ns.exec("iptables", &["-t", "nat", "-S"])?;
    assert!(
        nat.contains("MASQUERADE") && nat.contains("10.244.0.0/16"),
        "-ip-masq rules missing:\n{nat}"
    );

    let a2 = c.start_agent(2, &[])?;
    c.add_containers(2, &a2, 1)?;
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    all_pairs_reachable(&c)?;

    assert_eq!(c.agent_get(1, "/healthz")?.trim(), "ok");
    assert_eq!(c.agent_get(1, "/readyz")?.trim(), "ready");
    let metrics = c.agent_get(1, "/metrics")?;
    for needle in [
        "overlay_peers 1", "overlay_ready 1", "overlay_encapsulated_packets_total{format=\"vxlan\"}",
        "overlay_dropped_packets_total{reason=\"no_peer\"}", "overlay_lease_expiry_timestamp_seconds",
        "overlay_etcd_reconnects_total",
    ] {
        assert!(metrics.contains(needle), "/metrics lacks {needle}:\n{metrics}");
    }
    // Counters in /metrics are refreshed every second.
    c.wait_until("the pings show in the encap counter", Duration::from_secs(3), || {
        let m = c.agent_get(1, "/metrics")?;
        let encap: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix("overlay_encapsulated_packets_total{format=\"vxlan\"} "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(encap >= 3)
    })?;
    assert!(c.agent_get(1, "/nope").is_err(), "unknown paths answer 404");
    let status = c.status(1)?;
    assert_eq!(status["ready"], true);
    assert_eq!(status["subnet"], a1.ready["subnet"]);
    // `overlay status` prints the same for people.
    let bin = overlay_tests::lab::workspace_bin("overlay");
    let port = overlay_tests::cluster::HEALTHZ_PORT.to_string();
    let text = c
        .lab
        .host(1)
        .ns
        .exec(bin.to_str().unwrap(), &["status", "--healthz-port", &port])?;
    let subnet = a1.ready["subnet"].as_str().unwrap();
    assert!(
        text.contains(subnet) && text.contains("peers:      1") && text.contains("encap_vxlan"),
        "{text}"
    );

    // Masquerading stays while the agent is stopped, as flanneld leaves it: no gap across a restart.
    a1.stop()?;
    let nat = c.lab.host(1).ns.exec("iptables", &["-t", "nat", "-S"])?;
    assert!(
        nat.contains("MASQUERADE") && nat.contains("FLANNEL-POSTRTG"),
        "masquerading gone after the agent stopped:\n{nat}"
    );
    drop(a2);
    Ok(())
}
