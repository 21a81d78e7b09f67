//! Host routing end to end: `overlay agent` as a flannel unit starts it (defaults, so
//! `--host-routing=bpf`, under `ip netns exec`, real etcd), containers behind docker0, real
//! traffic, and the agents' counters proving that the shortcut carried it.
use std::time::Duration;

use overlay_tests::{
    cluster::Cluster,
    lab::{OverlayProcess, SWITCH_IP},
    traffic::{ping, tcp_transfer_verified},
};

const TRANSFER: u64 = 50 * 1024 * 1024;

fn config(backend: &str) -> String {
    format!(r#"{{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{{"Type":"{backend}"}}}}"#)
}

fn counter(agent: &OverlayProcess, name: &str) -> anyhow::Result<(u64, u64)> {
    let v = agent.counters()?;
    let c = &v["counters"][name];
    Ok((c["packets"].as_u64().unwrap_or(0), c["bytes"].as_u64().unwrap_or(0)))
}

/// Ping `count` times every 20 ms from `from` (a namespace name) to `to`, in the background.
fn background_ping(
    from: String,
    to: std::net::Ipv4Addr,
    count: u32,
) -> std::thread::JoinHandle<anyhow::Result<overlay_tests::traffic::PingResult>> {
    std::thread::spawn(move || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &from,
                "ping",
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                "0.02",
                "-W",
                "1",
            ])
            .arg(to.to_string())
            .output()?;
        overlay_tests::traffic::parse_ping(&String::from_utf8_lossy(&out.stdout))
    })
}

fn shortcut_end_to_end(backend: &str) -> anyhow::Result<()> {
    let mut c = Cluster::new(2, &config(backend))?;
    let mut agents = Vec::new();
    for (i, containers) in [(1, 2), (2, 1)] {
        let a = c.start_agent(i, &["--ip-masq"])?;
        c.add_containers(i, &a, containers)?;
        agents.push(a);
    }
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    let status = c.status(1)?;
    assert!(
        status["backend"].as_str().unwrap_or("").contains("host routing bpf"),
        "{backend}: /status {status}"
    );
    let mtu = agents[0].ready["mtu"].as_u64().unwrap() as u32;
    let (h1, h2) = (c.lab.host(1), c.lab.host(2));
    let (c1a, c1b, c2) = (&h1.containers[0], &h1.containers[1], &h2.containers[0]);

    // Both ways, two containers on one host, and between those two (the bridge's own path).
    for (from, to) in [(c1a, c2), (c2, c1a), (c1b, c2), (c2, c1b), (c1a, c1b)] {
        let r = ping(&from.ns, to.ip, 3, 56, false, "0.05")?;
        assert_eq!(r.received, 3, "{backend}: ping {} -> {}: {r:?}", from.ip, to.ip);
    }
    // The agents learn the containers from the bridge (once a second): then pings take the
    // shortcut on both ends.
    c.wait_until(
        "both agents carry pings on the shortcut",
        Duration::from_secs(5),
        || {
            let before = (
                counter(&agents[0], "shortcut_to_container")?.0,
                counter(&agents[1], "shortcut_to_container")?.0,
            );
            ping(&c1a.ns, c2.ip, 1, 56, false, "0.05")?;
            ping(&c2.ns, c1a.ip, 1, 56, false, "0.05")?;
            Ok(counter(&agents[0], "shortcut_to_container")?.0 > before.0
                && counter(&agents[1], "shortcut_to_container")?.0 > before.1)
        },
    )?;
    // The second container too (learned on its own tick: under load it can come a second later).
    c.wait_until(
        "host1 delivers to its second container on the shortcut",
        Duration::from_secs(5),
        || {
            let before = counter(&agents[0], "shortcut_to_container")?.0;
            ping(&c2.ns, c1b.ip, 1, 56, false, "0.05")?;
            Ok(counter(&agents[0], "shortcut_to_container")?.0 > before)
        },
    )?;

    // 50 MB each way, every byte checked, carried by the shortcut (counted on both ends).
    let from1 = counter(&agents[0], "shortcut_from_container")?.1;
    let to2 = counter(&agents[1], "shortcut_to_container")?.1;
    assert_eq!(tcp_transfer_verified(&c1a.ns, &c2.ns, c2.ip, 5201, TRANSFER)?, TRANSFER);
    let sent = counter(&agents[0], "shortcut_from_container")?.1 - from1;
    let delivered = counter(&agents[1], "shortcut_to_container")?.1 - to2;
    assert!(
        sent >= TRANSFER,
        "{backend}: host1 sent {sent} bytes of {TRANSFER} on the shortcut"
    );
    assert!(
        delivered >= TRANSFER,
        "{backend}: host2 delivered {delivered} bytes of {TRANSFER} on the shortcut"
    );
    let to1 = counter(&agents[0], "shortcut_to_container")?.1;
    assert_eq!(
        tcp_transfer_verified(&c2.ns, &c1b.ns, c1b.ip, 5202, TRANSFER)?,
        TRANSFER
    );
    let delivered = counter(&agents[0], "shortcut_to_container")?.1 - to1;
    assert!(
        delivered >= TRANSFER,
        "{backend}: host1 delivered {delivered} bytes on the shortcut"
    );

    // Host <-> container, across hosts (the host's own packets take the overlay device).
    for (ns, ip) in [(&h1.ns, c2.ip), (&h2.ns, c1a.ip)] {
        let r = ping(ns, ip, 3, 56, false, "0.05")?;
        assert_eq!(r.received, 3, "{backend}: host -> {ip}: {r:?}");
    }
    // The outside world, masqueraded by the stack: the switch has no route to our subnets.
    let r = ping(&c1a.ns, SWITCH_IP, 3, 56, false, "0.05")?;
    assert_eq!(
        r.received, 3,
        "{backend}: container -> outside ({SWITCH_IP}) with --ip-masq: {r:?}"
    );

    // MTU edge: the largest DF packet arrives; one byte more gets "fragmentation needed" from
    // the stack, which the shortcut hands it to. (host-gw: the overlay MTU is the underlay's,
    // which is the containers' too, so nothing larger can be sent.)
    let max_payload = mtu - 28;
    let r = ping(&c1a.ns, c2.ip, 3, max_payload, true, "0.05")?;
    assert_eq!(r.received, 3, "{backend}: {max_payload}-byte DF ping: {r:?}");
    if backend != "host-gw" {
        mtu_edge(backend, &agents[0], c1a, c2, mtu)?;
    }

    restart_container_then_agent(&mut c, agents, backend)
}

fn mtu_edge(
    backend: &str,
    agent: &OverlayProcess,
    c1a: &overlay_tests::lab::Container,
    c2: &overlay_tests::lab::Container,
    mtu: u32,
) -> anyhow::Result<()> {
    let max_payload = mtu - 28;
    let r = ping(&c1a.ns, c2.ip, 3, max_payload, true, "0.05")?;
    assert_eq!(r.received, 3, "{backend}: {max_payload}-byte DF ping: {r:?}");
    let oversize = counter(agent, "shortcut_oversize")?.0;
    c1a.ns.ip(&["link", "set", "eth0", "mtu", "1500"])?;
    let out = c1a
        .ns
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
            &(max_payload + 1).to_string(),
        ])
        .arg(c2.ip.to_string())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains(&format!("mtu = {mtu}")) || text.contains(&format!("mtu={mtu}")),
        "{backend}: oversize DF ping should get fragmentation-needed with mtu {mtu}, got: {text}"
    );
    c1a.ns.ip(&["link", "set", "eth0", "mtu", &mtu.to_string()])?;
    assert!(
        counter(agent, "shortcut_oversize")?.0 > oversize,
        "{backend}: oversize not counted"
    );
    Ok(())
}

fn restart_container_then_agent(c: &mut Cluster, mut agents: Vec<OverlayProcess>, backend: &str) -> anyhow::Result<()> {
    let c2 = &c.lab.host(2).containers[0];

    // A container restarts: new veth (new ifindex), same IP, new MAC. Nothing reaches the old
    // port; once the new container has spoken, the agent follows it within a second.
    let c2_ip = c2.ip;
    c.lab.hosts[0].recreate_container(0)?;
    let c1a = &c.lab.host(1).containers[0];
    let c2 = &c.lab.host(2).containers[0];
    assert_eq!(c2.ip, c2_ip);
    c1a.ns.ip(&["link", "set", "eth0", "address", "02:42:0a:f4:ee:01"])?;
    let r = ping(&c1a.ns, c2.ip, 3, 56, false, "0.05")?;
    assert_eq!(r.received, 3, "{backend}: restarted container -> {}: {r:?}", c2.ip);
    c.wait_until(
        "the restarted container is reached on the shortcut",
        Duration::from_secs(3),
        || {
            let before = counter(&agents[0], "shortcut_to_container")?.0;
            let r = ping(&c2.ns, c1a.ip, 1, 56, false, "0.05")?;
            anyhow::ensure!(r.received == 1, "ping to the restarted container lost");
            Ok(counter(&agents[0], "shortcut_to_container")?.0 > before)
        },
    )?;
    let r = ping(&c2.ns, c1a.ip, 5, 56, false, "0.05")?;
    assert_eq!(r.received, 5, "{backend}: -> restarted container: {r:?}");

    // Agent restart: not one ping lost (the stack's path carries them while no agent runs).
    let c1a_ip = c1a.ip;
    let pinger = background_ping(c2.ns.name().to_string(), c1a_ip, 150);
    std::thread::sleep(Duration::from_millis(500));
    agents.remove(0).stop()?;
    let restarted = c.start_agent(1, &["--ip-masq"])?;
    let c2 = &c.lab.host(2).containers[0];
    let r = pinger.join().expect("pinger")?;
    assert_eq!(r.received, 150, "{backend}: pings lost across the agent restart: {r:?}");
    c.wait_until(
        "the restarted agent takes the shortcut again",
        Duration::from_secs(5),
        || {
            ping(&c2.ns, c1a_ip, 1, 56, false, "0.05")?;
            Ok(counter(&restarted, "shortcut_to_container")?.0 > 0)
        },
    )?;
    drop(restarted);
    Ok(())
}

#[test]
fn vxlan_containers_skip_the_host_stack() -> anyhow::Result<()> {
    shortcut_end_to_end("vxlan")
}

#[test]
fn udp_containers_skip_the_host_stack() -> anyhow::Result<()> {
    shortcut_end_to_end("udp")
}

/// eBPF host-gw: no encapsulation, the same shortcut on both ends.
#[test]
fn host_gw_containers_skip_the_host_stack() -> anyhow::Result<()> {
    shortcut_end_to_end("host-gw")
}

/// `--host-routing=kernel`: today's path, nothing counted on the shortcut.
#[test]
fn kernel_host_routing_leaves_the_stack_path() -> anyhow::Result<()> {
    let mut c = Cluster::new(2, &config("vxlan"))?;
    let mut agents = Vec::new();
    for i in 1..=2 {
        let a = c.start_agent(i, &["--host-routing=kernel"])?;
        c.add_containers(i, &a, 1)?;
        agents.push(a);
    }
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    let status = c.status(1)?;
    assert!(
        status["backend"]
            .as_str()
            .unwrap_or("")
            .contains("host routing kernel (--host-routing=kernel)"),
        "/status {status}"
    );
    let (c1, c2) = (&c.lab.host(1).containers[0], &c.lab.host(2).containers[0]);
    std::thread::sleep(Duration::from_millis(1500));
    for (from, to) in [(c1, c2), (c2, c1)] {
        let r = ping(&from.ns, to.ip, 5, 56, false, "0.05")?;
        assert_eq!(r.received, 5, "ping {} -> {}: {r:?}", from.ip, to.ip);
    }
    assert_eq!(
        tcp_transfer_verified(&c1.ns, &c2.ns, c2.ip, 5201, TRANSFER / 10)?,
        TRANSFER / 10
    );
    for a in &agents {
        for name in ["shortcut_to_container", "shortcut_from_container"] {
            assert_eq!(counter(a, name)?.0, 0, "{name} with --host-routing=kernel");
        }
        assert!(counter(a, "encap_vxlan")?.0 > 0);
    }
    Ok(())
}
