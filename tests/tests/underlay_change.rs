//! The underlay changing under running agents: the NIC re-created (deleted, then added again
//! with the same name, MAC and address, as a re-bound NIC or a rebuilt veth is), or its address
//! changed (our PublicIP follows it into etcd, and the peers re-point their entries for us).
//! The agent notices over rtnetlink and reports the datapath detached while the NIC is gone.
//! Recovery is measured with pings 20 ms apart across the change.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    process::Command,
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use overlay_tests::{cluster::Cluster, lab::underlay_ip};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;

/// Timestamps (seconds since the epoch) of the replies `ping -D` printed.
fn reply_times(text: &str) -> Vec<f64> {
    text.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect()
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

#[test]
fn underlay_recreated_with_same_name_and_address() -> anyhow::Result<()> {
    let mut c = Cluster::new(2, VXLAN)?;
    let mut agents = Vec::new();
    for i in 1..=2 {
        let agent = c.start_agent(i, &[])?;
        c.add_containers(i, &agent, 1)?;
        agents.push(agent);
    }
    c.wait_full_mesh(2, Duration::from_secs(10))?;

    let h1 = c.lab.host(1).ns.name().to_string();
    let sw = c.switch().name().to_string();
    let mac = c.lab.host(1).ns.exec("cat", &["/sys/class/net/eth0/address"])?;
    let mac = mac.trim().to_string();
    // 300 pings 20 ms apart (6 s) from host2's container to host1's across the change.
    let from = c.lab.host(2).containers[0].ns.name().to_string();
    let to = c.lab.host(1).containers[0].ip;
    let pinger = std::thread::spawn(move || {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &from, "ping", "-D", "-n", "-c", "300", "-i", "0.02", "-W", "1",
            ])
            .arg(to.to_string())
            .output()
            .expect("ping");
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    std::thread::sleep(Duration::from_millis(1000));

    // host1's NIC goes: its veth is deleted from the switch's side, which takes eth0 with it.
    c.switch().ip(&["link", "del", "p1"])?;
    let gone = Instant::now();
    let noticed = c.wait_until("/readyz says the datapath is detached", Duration::from_secs(3), || {
        Ok(c.agent_get(1, "/readyz").is_err_and(|e| e.to_string().contains("503")))
    })?;
    let metrics = c.agent_get(1, "/metrics")?;
    assert!(metrics.contains("overlay_datapath_attached 0"), "{metrics}");
    eprintln!("underlay deleted: /readyz 503 after {noticed:?}");
    std::thread::sleep(Duration::from_millis(300).saturating_sub(gone.elapsed()));

    // ...and comes back with the same name, MAC and address.
    let ip = |ns: &str, args: &[&str]| -> anyhow::Result<()> {
        overlay_tests::netns::run(Command::new("ip").args(["netns", "exec", ns, "ip"]).args(args)).map(drop)
    };
    ip(
        &sw,
        &[
            "link", "add", "p1", "type", "veth", "peer", "name", "eth0", "address", &mac, "netns", &h1,
        ],
    )?;
    ip(&sw, &["link", "set", "p1", "master", "sw0", "up"])?;
    ip(&h1, &["addr", "add", &format!("{}/24", underlay_ip(1)), "dev", "eth0"])?;
    ip(&h1, &["link", "set", "eth0", "up"])?;
    let back = SystemTime::now();
    let back_instant = Instant::now();
    let ready_again = c.wait_until("/readyz is 200 again", Duration::from_secs(5), || {
        Ok(c.agent_get(1, "/readyz").is_ok())
    })?;
    let metrics = c.agent_get(1, "/metrics")?;
    assert!(metrics.contains("overlay_datapath_attached 1"), "{metrics}");
    assert!(metrics.contains("overlay_underlay_reattached_total 1"), "{metrics}");

    let text = pinger.join().expect("pinger");
    let replies = reply_times(&text);
    let first_after = replies.iter().copied().find(|t| *t > epoch(back));
    let lost = 300 - replies.len();
    eprintln!(
        "underlay re-created: /readyz 200 after {ready_again:?}; first ping reply {} after it was back; \
         {lost} of 300 pings lost (delete to re-creation took {:?})",
        first_after.map_or("never".to_string(), |t| format!("{:.0} ms", (t - epoch(back)) * 1000.0)),
        back_instant - gone,
    );
    let recovery = first_after.map(|t| t - epoch(back)).unwrap_or(f64::INFINITY);
    assert!(
        recovery < 1.0,
        "traffic did not recover within 1 s of the NIC being back:\n{text}"
    );
    // Every ping after recovery is answered.
    let last = *replies.last().unwrap();
    let after: Vec<&f64> = replies.iter().filter(|t| **t > epoch(back) + recovery).collect();
    assert!(
        last - (epoch(back) + recovery) > 2.0,
        "pinging ended too early to judge:\n{text}"
    );
    assert!(
        after.len() >= 100,
        "too few replies after recovery ({}):\n{text}",
        after.len()
    );
    drop(agents);
    Ok(())
}

/// `count` pings 20 ms apart from namespace `from` to `to`, on a thread; gives ping's output.
fn ping_in_background(from: &str, to: Ipv4Addr, count: u32) -> JoinHandle<String> {
    let from = from.to_string();
    std::thread::spawn(move || {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &from, "ping", "-D", "-n", "-i", "0.02", "-W", "1", "-c",
            ])
            .arg(count.to_string())
            .arg(to.to_string())
            .output()
            .expect("ping");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

/// How traffic came through a change at `changed`: replies lost, and the seconds from the
/// change until every ping was answered again (the first reply after the last lost one; 0
/// when none was lost).
struct Recovery {
    lost: usize,
    seconds: f64,
}

fn recovery(text: &str, count: u32, changed: SystemTime) -> anyhow::Result<Recovery> {
    // icmp_seq -> reply time.
    let replies: BTreeMap<u32, f64> = text
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            let t = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok()?;
            Some((seq, t))
        })
        .collect();
    let lost: Vec<u32> = (1..=count).filter(|s| !replies.contains_key(s)).collect();
    let Some(&last_lost) = lost.last() else {
        return Ok(Recovery { lost: 0, seconds: 0.0 });
    };
    let Some((_, &back)) = replies.range(last_lost..).next() else {
        anyhow::bail!("no reply after ping {last_lost}: traffic never came back:\n{text}");
    };
    anyhow::ensure!(
        count - last_lost >= 50,
        "pings were lost until the end ({last_lost} of {count}): traffic did not settle:\n{text}"
    );
    Ok(Recovery {
        lost: lost.len(),
        seconds: (back - epoch(changed)).max(0.0),
    })
}

/// The value etcd holds for the lease of `subnet` (as the ready line gives it, `a.b.c.d/n`).
fn lease_value(c: &Cluster, subnet: &str) -> anyhow::Result<String> {
    let key = format!("/coreos.com/network/subnets/{}", subnet.replace('/', "-"));
    c.etcdctl(&["get", &key, "--print-value-only"])
}

#[test]
fn public_ip_follows_the_underlays_new_address() -> anyhow::Result<()> {
    let mut c = Cluster::new(2, VXLAN)?;
    // As a flannel unit starts flanneld: the defaults, etcd, the interface, masquerading.
    let mut agents = Vec::new();
    for i in 1..=2 {
        let agent = c.start_agent(i, &["--ip-masq"])?;
        c.add_containers(i, &agent, 1)?;
        agents.push(agent);
    }
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    let subnet = agents[0].ready["subnet"].as_str().unwrap_or_default().to_string();
    let (old, new) = (underlay_ip(1), Ipv4Addr::new(192, 168, 250, 101));
    assert!(lease_value(&c, &subnet)?.contains(&format!("\"PublicIP\":\"{old}\"")));

    const COUNT: u32 = 300;
    let (c1, c2) = (&c.lab.host(1).containers[0], &c.lab.host(2).containers[0]);
    let one_to_two = ping_in_background(c1.ns.name(), c2.ip, COUNT);
    let two_to_one = ping_in_background(c2.ns.name(), c1.ip, COUNT);
    std::thread::sleep(Duration::from_millis(1000));

    // host1 is renumbered (DHCP gave it another address): the old one goes, the new one
    // comes, on the same link; host2 still reaches it through the switch.
    let h1 = &c.lab.host(1).ns;
    h1.ip(&["addr", "del", &format!("{old}/24"), "dev", "eth0"])?;
    h1.ip(&["addr", "add", &format!("{new}/24"), "dev", "eth0"])?;
    let changed = SystemTime::now();
    let in_etcd = c.wait_until("the lease in etcd has the new PublicIP", Duration::from_secs(5), || {
        Ok(lease_value(&c, &subnet)?.contains(&format!("\"PublicIP\":\"{new}\"")))
    })?;
    let peer_sees = c.wait_until("host2 has host1 at its new address", Duration::from_secs(5), || {
        let s = c.status(2)?;
        Ok(s["peers"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["subnet"] == subnet.as_str() && p["public_ip"] == new.to_string().as_str())
        }))
    })?;
    // Both waits started at the change, one after the other.
    let peer_sees = in_etcd + peer_sees;

    let (a, b) = (one_to_two.join().expect("pinger"), two_to_one.join().expect("pinger"));
    let (ra, rb) = (recovery(&a, COUNT, changed)?, recovery(&b, COUNT, changed)?);
    eprintln!(
        "underlay address changed: lease in etcd updated after {in_etcd:?}, host2's peer entry after \
         {:?}; pings flow again both ways {:.0} ms after the change (host1->host2 {:.0} ms, {} lost; \
         host2->host1 {:.0} ms, {} lost, of {COUNT} each)",
        peer_sees,
        ra.seconds.max(rb.seconds) * 1000.0,
        ra.seconds * 1000.0,
        ra.lost,
        rb.seconds * 1000.0,
        rb.lost,
    );
    let value = lease_value(&c, &subnet)?;
    assert!(
        !value.contains(&format!("\"PublicIP\":\"{old}\"")),
        "the old PublicIP is still in {value}"
    );
    assert_eq!(c.status(1)?["public_ip"], new.to_string().as_str());
    // Same subnet: the containers keep their addresses.
    let env = std::fs::read_to_string(c.subnet_file(1))?;
    let first = subnet
        .split('/')
        .next()
        .unwrap_or_default()
        .rsplit_once('.')
        .map(|(n, _)| n)
        .unwrap_or_default();
    assert!(env.contains(&format!("FLANNEL_SUBNET={first}.1/")), "{env}");
    assert!(
        ra.seconds.max(rb.seconds) < 2.0,
        "traffic took over 2 s to recover:\n{a}\n{b}"
    );
    drop(agents);
    Ok(())
}

/// A counter's value in the agent's `/metrics` text (0 when absent).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The container bridge deleted and added again (same name and address, the ports plugged back),
/// as a container runtime restarting or a CNI plugin rebuilding `cni0` does. The overlay itself
/// is unharmed, so `/readyz` stays 200 (a bridge is no precondition: `cni0` appears with the
/// first pod). What carries packets to the container follows the new bridge: host routing
/// (learning the endpoint again), or with `--host-routing=kernel` the bridge program on its
/// egress (TC decapsulation, as on this veth underlay).
fn container_bridge_recreated(host_routing: &str) -> anyhow::Result<()> {
    let mut c = Cluster::new(2, VXLAN)?;
    let mut agents = Vec::new();
    let flag = format!("--host-routing={host_routing}");
    for i in 1..=2 {
        let agent = c.start_agent(i, &["--ip-masq", &flag])?;
        c.add_containers(i, &agent, 1)?;
        agents.push(agent);
    }
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    let counter = match host_routing {
        "bpf" => "overlay_host_routing_packets_total{path=\"to_container\"}",
        _ => "overlay_bridge_frames_total{path=\"port\"}",
    };
    let subnet: ipnetwork::Ipv4Network = agents[0].ready["subnet"].as_str().unwrap_or_default().parse()?;
    let mtu = agents[0].ready["mtu"].as_u64().unwrap_or_default().to_string();
    let bip = format!(
        "{}/{}",
        Ipv4Addr::from(u32::from(subnet.network()) + 1),
        subnet.prefix()
    );

    const COUNT: u32 = 400;
    let (c1, c2) = (&c.lab.host(1).containers[0], &c.lab.host(2).containers[0]);
    let pinger = ping_in_background(c2.ns.name(), c1.ip, COUNT);
    // Host routing learns the endpoint from the bridge's neighbour table (the first pings'
    // ARP); the counters are read each second.
    c.wait_until(&format!("{counter} counts the pings"), Duration::from_secs(3), || {
        Ok(metric(&c.agent_get(1, "/metrics")?, counter) > 0)
    })?;

    let h1 = &c.lab.host(1).ns;
    h1.ip(&["link", "del", "docker0"])?;
    let gone = Instant::now();
    // Give the agent time to see the bridge go, then check what it reports meanwhile.
    std::thread::sleep(Duration::from_millis(200));
    let ready_while_gone = c.agent_get(1, "/readyz");
    assert!(ready_while_gone.is_ok(), "{ready_while_gone:?}");
    std::thread::sleep(Duration::from_millis(300).saturating_sub(gone.elapsed()));
    h1.ip(&["link", "add", "docker0", "type", "bridge"])?;
    h1.ip(&["addr", "add", &bip, "dev", "docker0"])?;
    h1.ip(&["link", "set", "docker0", "mtu", &mtu, "up"])?;
    h1.ip(&["link", "set", "veth0", "master", "docker0"])?;
    let back = SystemTime::now();
    let gone_for = gone.elapsed();
    let at_back = metric(&c.agent_get(1, "/metrics")?, counter);

    let text = pinger.join().expect("pinger");
    let r = recovery(&text, COUNT, back)?;
    std::thread::sleep(Duration::from_millis(1100));
    let after = metric(&c.agent_get(1, "/metrics")?, counter);
    eprintln!(
        "container bridge re-created (host routing {host_routing}): pings to the container answered again \
         {:.0} ms after the bridge was back ({} of {COUNT} lost, the bridge was gone {gone_for:?}); \
         {counter} {at_back} -> {after}",
        r.seconds * 1000.0,
        r.lost,
    );
    assert!(r.seconds < 2.0, "traffic took over 2 s to recover:\n{text}");
    // The pings after recovery took the eBPF path again, not only the bridge's own.
    assert!(
        after >= at_back + 100,
        "{counter} grew by {} after the bridge was back:\n{}",
        after - at_back,
        c.agent_get(1, "/status")?
    );
    drop(agents);
    Ok(())
}

#[test]
fn container_bridge_recreated_host_routing_follows() -> anyhow::Result<()> {
    container_bridge_recreated("bpf")
}

#[test]
fn container_bridge_recreated_bridge_program_follows() -> anyhow::Result<()> {
    container_bridge_recreated("kernel")
}

/// host1's NIC deleted and added again with the same name, MAC and address (its veth deleted
/// from the switch's side, which takes eth0 with it, then plugged again).
fn recreate_underlay(c: &Cluster, gone_for: Duration) -> anyhow::Result<()> {
    let h1 = c.lab.host(1).ns.name().to_string();
    let sw = c.switch().name().to_string();
    let mac = c.lab.host(1).ns.exec("cat", &["/sys/class/net/eth0/address"])?;
    let mac = mac.trim().to_string();
    c.switch().ip(&["link", "del", "p1"])?;
    std::thread::sleep(gone_for);
    let ip = |ns: &str, args: &[&str]| -> anyhow::Result<()> {
        overlay_tests::netns::run(Command::new("ip").args(["netns", "exec", ns, "ip"]).args(args)).map(drop)
    };
    ip(
        &sw,
        &[
            "link", "add", "p1", "type", "veth", "peer", "name", "eth0", "address", &mac, "netns", &h1,
        ],
    )?;
    ip(&sw, &["link", "set", "p1", "master", "sw0", "up"])?;
    ip(&h1, &["addr", "add", &format!("{}/24", underlay_ip(1)), "dev", "eth0"])?;
    ip(&h1, &["link", "set", "eth0", "up"])
}

#[derive(Clone, Copy, Debug)]
enum Change {
    /// The NIC deleted and re-created, gone 300 ms.
    Recreated,
    /// A new address on the NIC (PublicIP from `--iface`).
    Renumbered,
}

/// Under `--datapath <datapath>`, host1's underlay changes while containers ping both ways;
/// traffic must come back, and after a new address our lease in etcd must carry it.
fn backend_follows(config: &str, datapath: &str, change: Change) -> anyhow::Result<()> {
    let mut c = Cluster::new(2, config)?;
    let mut agents = Vec::new();
    for i in 1..=2 {
        let agent = c.start_agent(i, &["--ip-masq", &format!("--datapath={datapath}")])?;
        c.add_containers(i, &agent, 1)?;
        agents.push(agent);
    }
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    let backend = agents[0].ready["backend"].as_str().unwrap_or_default().to_string();
    let subnet = agents[0].ready["subnet"].as_str().unwrap_or_default().to_string();
    const COUNT: u32 = 300;
    let (c1, c2) = (&c.lab.host(1).containers[0], &c.lab.host(2).containers[0]);
    let one_to_two = ping_in_background(c1.ns.name(), c2.ip, COUNT);
    let two_to_one = ping_in_background(c2.ns.name(), c1.ip, COUNT);
    std::thread::sleep(Duration::from_millis(1000));

    let new = Ipv4Addr::new(192, 168, 250, 101);
    match change {
        Change::Recreated => recreate_underlay(&c, Duration::from_millis(300))?,
        Change::Renumbered => {
            let h1 = &c.lab.host(1).ns;
            h1.ip(&["addr", "del", &format!("{}/24", underlay_ip(1)), "dev", "eth0"])?;
            h1.ip(&["addr", "add", &format!("{new}/24"), "dev", "eth0"])?;
        }
    }
    let changed = SystemTime::now();
    let (a, b) = (one_to_two.join().expect("pinger"), two_to_one.join().expect("pinger"));
    let (ra, rb) = (recovery(&a, COUNT, changed), recovery(&b, COUNT, changed));
    let shown = |r: &anyhow::Result<Recovery>| match r {
        Ok(r) => format!("{:.0} ms, {} lost", r.seconds * 1000.0, r.lost),
        Err(_) => "never".into(),
    };
    eprintln!(
        "{backend}, underlay {change:?}: pings flow again host1->host2 after {}, host2->host1 after {} \
         (of {COUNT} each, 20 ms apart)",
        shown(&ra),
        shown(&rb),
    );
    let (ra, rb) = (ra?, rb?);
    if let Change::Renumbered = change {
        let value = lease_value(&c, &subnet)?;
        assert!(value.contains(&format!("\"PublicIP\":\"{new}\"")), "{value}");
    }
    assert!(
        ra.seconds.max(rb.seconds) < 2.0,
        "traffic took over 2 s to recover:\n{a}\n{b}"
    );
    drop(agents);
    Ok(())
}

const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}"#;
const UDP: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}"#;

#[test]
fn kernel_vxlan_follows_a_recreated_underlay() -> anyhow::Result<()> {
    backend_follows(VXLAN, "kernel", Change::Recreated)
}

#[test]
fn kernel_vxlan_follows_a_new_address() -> anyhow::Result<()> {
    backend_follows(VXLAN, "kernel", Change::Renumbered)
}

#[test]
fn kernel_host_gw_follows_a_recreated_underlay() -> anyhow::Result<()> {
    backend_follows(HOST_GW, "kernel", Change::Recreated)
}

#[test]
fn kernel_host_gw_follows_a_new_address() -> anyhow::Result<()> {
    backend_follows(HOST_GW, "kernel", Change::Renumbered)
}

#[test]
fn userspace_udp_follows_a_recreated_underlay() -> anyhow::Result<()> {
    backend_follows(UDP, "kernel", Change::Recreated)
}

#[test]
fn userspace_udp_follows_a_new_address() -> anyhow::Result<()> {
    backend_follows(UDP, "kernel", Change::Renumbered)
}

#[test]
fn ebpf_host_gw_follows_a_recreated_underlay() -> anyhow::Result<()> {
    backend_follows(HOST_GW, "ebpf", Change::Recreated)
}

#[test]
fn ebpf_host_gw_follows_a_new_address() -> anyhow::Result<()> {
    backend_follows(HOST_GW, "ebpf", Change::Renumbered)
}

#[test]
fn ebpf_udp_follows_a_recreated_underlay() -> anyhow::Result<()> {
    backend_follows(UDP, "ebpf", Change::Recreated)
}

#[test]
fn ebpf_udp_follows_a_new_address() -> anyhow::Result<()> {
    backend_follows(UDP, "ebpf", Change::Renumbered)
}
