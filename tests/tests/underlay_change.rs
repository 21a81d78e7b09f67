//! The underlay NIC re-created under a running agent (deleted, then added again with the same
//! name, MAC and address, as a re-bound NIC or a rebuilt veth is): the agent notices over
//! rtnetlink, reports the datapath detached while the NIC is gone, and attaches again when
//! it is back. Recovery is measured with pings 20 ms apart across the change.
use std::{
    process::Command,
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
