//! A 3-member etcd cluster in the lab whose members go away as hosts (their address removed,
//! so SYNs to them go unanswered, as with a powered-off machine): an agent listing the dead
//! endpoints first is ready quickly, and with quorum lost the survivor's "no leader" is what
//! the user reads, not a dead member's connect error.
use std::{
    net::Ipv4Addr,
    process::Output,
    time::{Duration, Instant},
};

use overlay_tests::{
    etcd::Etcd,
    lab::{Lab, OverlayProcess, workspace_bin},
    netns::Netns,
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}"#;

fn member_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 250, 201 + i as u8)
}

/// An address on the underlay that no host has ever held.
const NEVER_A_HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 250, 209);

fn endpoint(ip: Ipv4Addr) -> String {
    format!("http://{ip}:2379")
}

/// A namespace on the lab's switch holding `ip` on its `eth0`.
fn plug_member(lab: &Lab, i: usize) -> Netns {
    let ns = Netns::new(&format!("e{i}")).unwrap();
    let sw = lab.switch.as_ref().unwrap();
    let port = format!("pe{i}");
    sw.ip(&[
        "link",
        "add",
        &port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])
    .unwrap();
    sw.ip(&["link", "set", &port, "master", "sw0", "up"]).unwrap();
    ns.ip(&["addr", "add", &format!("{}/24", member_ip(i)), "dev", "eth0"])
        .unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    ns
}

/// Make `ip` a host that is gone: its frames still reach the member's namespace (a permanent
/// neighbour entry on the agent's host, so no ARP failure shortcuts the wait), which no longer
/// holds the address and drops them: the client's SYNs go unanswered.
fn gone_as_host(host: &Netns, member: &Netns, ip: Ipv4Addr) {
    let mac = member.exec("cat", &["/sys/class/net/eth0/address"]).unwrap();
    host.ip(&[
        "neigh",
        "replace",
        &ip.to_string(),
        "lladdr",
        mac.trim(),
        "nud",
        "permanent",
        "dev",
        "eth0",
    ])
    .unwrap();
    let _ = member.ip(&["addr", "del", &format!("{ip}/24"), "dev", "eth0"]);
}

fn overlay_in(ns: &Netns, args: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    let out = ns
        .command(workspace_bin("overlay").to_str().unwrap())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (out, start.elapsed())
}

#[test]
fn dead_members_skipped_and_lost_quorum_told_truthfully() {
    let lab = Lab::with_switch(1, 1500).unwrap();
    let members: Vec<Netns> = (0..3).map(|i| plug_member(&lab, i)).collect();
    let spec: Vec<(&str, Ipv4Addr)> = members
        .iter()
        .enumerate()
        .map(|(i, ns)| (ns.name(), member_ip(i)))
        .collect();
    let _etcd = Etcd::start_cluster_in_netns(&spec);
    let host = &lab.host(1).ns;
    let all = [member_ip(0), NEVER_A_HOST, member_ip(1), member_ip(2)]
        .map(endpoint)
        .join(",");
    let (out, _) = overlay_in(
        host,
        &["config", "set", "--etcd-endpoints", &endpoint(member_ip(2)), CONFIG],
    );
    assert!(
        out.status.success(),
        "config set: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Member 0 and an address that never was a host are listed first and answer nothing.
    gone_as_host(host, &members[0], member_ip(0));
    gone_as_host(host, &members[0], NEVER_A_HOST);
    // If member 0 led, the others elect a new leader first (about a second), during which no
    // endpoint can serve: the agent must then be ready as soon as they do, not after waiting
    // on a dead host. When the survivors serve is measured alongside.
    let gone = Instant::now();
    let host_name = host.name().to_string();
    let survivors_serve = std::thread::spawn(move || {
        let deadline = gone + Duration::from_secs(20);
        loop {
            let served = std::process::Command::new("ip")
                .args(["netns", "exec", &host_name, workspace_bin("overlay").to_str().unwrap()])
                .args(["leases", "--etcd-endpoints", &endpoint(member_ip(1))])
                .env("RUST_LOG", "off")
                .output()
                .is_ok_and(|o| o.status.success());
            if served {
                return gone.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "members 1 and 2 never served without member 0"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let subnet_file = dir.path().join("subnet.env");
    let args: Vec<String> = vec![
        "agent".into(),
        format!("-etcd-endpoints={}", all),
        "-iface=eth0".into(),
        format!("-subnet-file={}", subnet_file.display()),
        "-healthz-ip=127.0.0.1".into(),
        "-healthz-port=9098".into(),
    ];
    let start = Instant::now();
    let agent = OverlayProcess::start(host, &args, Duration::from_secs(60)).unwrap();
    let ready = start.elapsed();
    let serving = survivors_serve.join().unwrap();
    eprintln!("members 1 and 2 serve {serving:?} after member 0 went (an election when it led)");
    let written = std::fs::read_to_string(&subnet_file).unwrap();
    eprintln!("agent with 2 dead endpoints listed first: ready (subnet file written) after {ready:?}");
    assert!(written.contains("FLANNEL_SUBNET=10.244."), "{written}");
    // Each dead endpoint costs a 5 s connect timeout when tried in turn.
    assert!(
        ready < serving + Duration::from_secs(1),
        "ready after {ready:?}, members serving after {serving:?}"
    );

    let (out, took) = overlay_in(host, &["leases", "--etcd-endpoints", &all]);
    eprintln!("`overlay leases` with 2 dead endpoints listed first: {took:?}");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.244."));
    assert!(took < Duration::from_secs(1), "leases took {took:?}");
    drop(agent);

    // Member 1 goes too: member 2 is up but has no leader.
    gone_as_host(host, &members[1], member_ip(1));
    let survivor = endpoint(member_ip(2));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (out, _) = overlay_in(host, &["leases", "--etcd-endpoints", &survivor]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() && err.contains("no leader") {
            break;
        }
        assert!(Instant::now() < deadline, "the survivor never said no leader: {err}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let (out, took) = overlay_in(host, &["leases", "--etcd-endpoints", &all]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("quorum lost, after {took:?}:\n{err}");
    assert!(!out.status.success());
    let last = err
        .lines()
        .find(|l| l.contains("etcd has no leader"))
        .unwrap_or_else(|| panic!("the summary must lead with no leader: {err}"));
    assert!(
        last.contains(&format!("{survivor} answered \"no leader\"")),
        "the survivor's answer: {last}"
    );
    for dead in [member_ip(0), NEVER_A_HOST, member_ip(1)] {
        assert!(
            last.contains(&format!("{} did not answer", endpoint(dead))),
            "{dead} as not answering: {last}"
        );
    }
    assert!(
        !err.contains(&format!("{survivor} unreachable")) && !err.contains(&format!("{survivor} did not answer")),
        "the survivor answered: {err}"
    );
}
