//! `cargo xtask run`: the seeds' multi-host setup on one machine. Hosts are network namespaces
//! on an underlay switch where etcd runs; the network config goes to
//! `/coreos.com/network/config`; `overlay agent` runs on every host, leases a subnet and writes
//! its subnet file; docker-like bridges and containers are built from that file (`--bip`,
//! `--mtu`, as mk-docker-opts.sh tells docker); then every container pings every other one.
//! `--ipv6`: dual stack, the underlay and the network both carry IPv6 too, and the pings go both
//! ways in both families.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use ipnetwork::Ipv6Network;
use nix::sys::signal::{SigSet, Signal};
use overlay_tests::{
    cluster::Cluster,
    lab::{OverlayProcess, workspace_bin},
    traffic::ping,
};

#[derive(Parser)]
#[command(
    name = "overlay-demo",
    about = "A multi-host overlay network in network namespaces, run by overlay agents"
)]
struct Args {
    /// The network's Backend.Type.
    #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "udp", "host-gw"])]
    backend: String,
    /// Number of hosts.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=50))]
    hosts: u8,
    /// Containers per host.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=20))]
    containers: u8,
    /// Leave everything running on exit (namespaces, etcd, agents) for exploring.
    #[arg(long)]
    keep: bool,
    /// Print the tables and stop instead of waiting for Ctrl-C.
    #[arg(long)]
    once: bool,
    /// Dual stack: IPv6 on the underlay (fd01::<host>) and in the network (fd00:244::/56).
    #[arg(long)]
    ipv6: bool,
}

/// A host's IPv6 underlay address.
fn underlay_ipv6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, index as u16)
}

/// IPv6 for the demo's underlay: the switch and every host get an address, hosts forward IPv6.
fn add_ipv6_underlay(c: &Cluster) -> anyhow::Result<()> {
    c.switch().ip(&["addr", "add", "fd01::fe/64", "dev", "sw0", "nodad"])?;
    for h in &c.lab.hosts {
        h.ns.ip(&[
            "addr",
            "add",
            &format!("{}/64", underlay_ipv6(h.index)),
            "dev",
            "eth0",
            "nodad",
        ])?;
        h.ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    }
    Ok(())
}

/// docker0 and the containers of host `index` get IPv6 from the agent's IPv6 subnet, as docker's
/// `--ipv6 --fixed-cidr-v6` gives them (`overlay docker-opts -6`). Returns the containers' IPv6
/// addresses, in the order of the host's containers.
fn add_container_ipv6(c: &Cluster, index: usize, agent: &OverlayProcess) -> anyhow::Result<Vec<Ipv6Addr>> {
    let subnet: Ipv6Network = agent.ready["ipv6_subnet"]
        .as_str()
        .context("the agent's ready line has no ipv6_subnet")?
        .parse()?;
    let first = |n: u128| Ipv6Addr::from(u128::from(subnet.network()) + n);
    let h = c.lab.host(index);
    h.ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/{}", first(1), subnet.prefix()),
        "dev",
        "docker0",
        "nodad",
    ])?;
    let mut addrs = Vec::new();
    for (k, ct) in h.containers.iter().enumerate() {
        let ip = first(2 + k as u128);
        ct.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip}/{}", subnet.prefix()),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ct.ns
            .ip(&["-6", "route", "add", "default", "via", &first(1).to_string()])?;
        // A fresh bridge port's neighbour discovery takes a moment.
        let start = Instant::now();
        while h
            .ns
            .exec("ping", &["-n", "-c", "1", "-W", "1", &ip.to_string()])
            .is_err()
        {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("{} does not reach its container at {ip}", h.name());
            }
        }
        addrs.push(ip);
    }
    Ok(addrs)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Ctrl-C must reach our cleanup, not kill us midway: take the signals as data.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;

    let v6 = if args.ipv6 {
        r#""EnableIPv6":true,"IPv6Network":"fd00:244::/56","#
    } else {
        ""
    };
    let config = format!(
        r#"{{"Network":"10.244.0.0/16","SubnetLen":24,{v6}"Backend":{{"Type":"{}"}}}}"#,
        args.backend
    );
    let n = args.hosts as usize;
    println!("== {n} hosts on an underlay switch, etcd at the switch; network config:\n   {config}");
    let mut c = Cluster::new_opts(n, &config, !args.keep)?;
    if args.ipv6 {
        add_ipv6_underlay(&c)?;
    }

    println!("== starting `overlay agent` on every host, containers from each subnet file");
    let mut agents: Vec<OverlayProcess> = Vec::new();
    // Per host, its containers' IPv6 addresses (with --ipv6).
    let mut container_v6: Vec<Vec<Ipv6Addr>> = Vec::new();
    for i in 1..=n {
        let a = c.start_agent_opts(i, &["--ip-masq"], !args.keep)?;
        c.add_containers(i, &a, args.containers as usize)?;
        container_v6.push(if args.ipv6 {
            add_container_ipv6(&c, i, &a)?
        } else {
            Vec::new()
        });
        agents.push(a);
    }
    c.wait_full_mesh(n, Duration::from_secs(20))?;

    let docker_opts = (1..=n)
        .map(|i| {
            let out = c.dir().join(format!("host{i}/docker"));
            let bin = workspace_bin("overlay");
            let subnet_file = c.subnet_file(i);
            overlay_tests::netns::run(
                std::process::Command::new(bin)
                    .args(["docker-opts", "-6", "-f"])
                    .arg(&subnet_file)
                    .args(["-k", "DOCKER_NETWORK_OPTIONS", "-d"])
                    .arg(&out),
            )?;
            let text = std::fs::read_to_string(&out)?;
            let line = text
                .lines()
                .find(|l| l.starts_with("DOCKER_NETWORK_OPTIONS"))
                .unwrap_or("")
                .to_string();
            Ok(line)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    println!();
    println!(
        "{:<7} {:<16} {:<16} {:>5}  {:<44} docker options (from mk-docker-opts)",
        "host", "subnet", "PublicIP", "peers", "backend"
    );
    for (i, a) in agents.iter().enumerate() {
        let h = c.lab.host(i + 1);
        println!(
            "{:<7} {:<16} {:<16} {:>5}  {:<44} {}",
            h.name(),
            match a.ready["ipv6_subnet"].as_str() {
                Some(v6) => format!("{} {v6}", a.ready["subnet"].as_str().unwrap_or("")),
                None => a.ready["subnet"].as_str().unwrap_or("").to_string(),
            },
            match a.ready["public_ipv6"].as_str() {
                Some(v6) => format!("{} {v6}", h.public_ip),
                None => h.public_ip.to_string(),
            },
            c.peer_subnets(i + 1)?.len(),
            a.ready["backend"].as_str().unwrap_or(""),
            docker_opts[i]
        );
    }

    println!();
    println!("{:<30} {:<30} {:>8} {:>10}", "from", "to", "replies", "rtt avg");
    let mut failures = 0;
    for a in &c.lab.hosts {
        for (ka, ca) in a.containers.iter().enumerate() {
            for b in c.lab.hosts.iter().filter(|b| b.index != a.index) {
                for (kb, cb) in b.containers.iter().enumerate() {
                    let mut pairs: Vec<(IpAddr, IpAddr)> = vec![(ca.ip.into(), cb.ip.into())];
                    if args.ipv6 {
                        let (from, to) = (container_v6[a.index - 1][ka], container_v6[b.index - 1][kb]);
                        pairs.push((from.into(), to.into()));
                    }
                    for (from, to) in pairs {
                        let r = ping(&ca.ns, to, 3, 56, false, "0.05")?;
                        if r.received != r.transmitted {
                            failures += 1;
                        }
                        let avg = r.rtts_ms.iter().sum::<f64>() / r.rtts_ms.len().max(1) as f64;
                        println!(
                            "{:<30} {:<30} {:>8} {:>8.3}ms",
                            format!("{} {from}", a.name()),
                            format!("{} {to}", b.name()),
                            format!("{}/{}", r.received, r.transmitted),
                            avg
                        );
                    }
                }
            }
        }
    }
    println!();
    if failures == 0 {
        println!("all container pairs reachable");
    } else {
        println!("{failures} container pairs lost pings");
    }
    print_counters(&c)?;

    let example = format!(
        "ip netns exec {} ping {}",
        c.lab.host(1).containers[0].ns.name(),
        c.lab.host(2).containers[0].ip
    );
    let status = format!(
        "ip netns exec {} {} status --healthz-port {}",
        c.lab.host(1).ns.name(),
        workspace_bin("overlay").display(),
        overlay_tests::cluster::HEALTHZ_PORT
    );
    let leases = format!(
        "ip netns exec {} etcdctl --endpoints={} get --prefix /coreos.com/network",
        c.switch().name(),
        c.endpoint()
    );
    if args.keep {
        println!("\nleft running (--keep). Explore:\n  {example}\n  {status}\n  {leases}");
        println!(
            "remove with: ip netns list | grep ^ovlt | cut -d' ' -f1 | xargs -n1 ip netns del; pkill -f 'overlay agent'; pkill etcd"
        );
        for a in agents {
            std::mem::forget(a);
        }
        std::mem::forget(c);
    } else {
        if !args.once {
            println!(
                "\nrunning; explore in another shell:\n  {example}\n  {status}\n  {leases}\nCtrl-C stops and removes everything"
            );
            signals.wait()?;
        }
        for (i, a) in agents.into_iter().enumerate() {
            a.stop()
                .with_context(|| format!("stopping the agent on host{}", i + 1))?;
        }
        println!("stopped the agents; removing namespaces and etcd");
    }
    if failures > 0 {
        anyhow::bail!("{failures} container pairs could not reach each other");
    }
    Ok(())
}

fn print_counters(c: &Cluster) -> anyhow::Result<()> {
    // Counters reach /status within a second.
    std::thread::sleep(Duration::from_millis(1100));
    println!();
    println!("{:<7} counters (packets)", "host");
    for h in &c.lab.hosts {
        let s = c.status(h.index)?;
        let nonzero: BTreeMap<String, u64> = s["counters"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v["packets"].as_u64().filter(|p| *p > 0)?)))
                    .collect()
            })
            .unwrap_or_default();
        let text: Vec<String> = nonzero.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<7} {}",
            h.name(),
            if text.is_empty() {
                "(no datapath counters: host-gw or the kernel's datapath)".into()
            } else {
                text.join(" ")
            }
        );
    }
    Ok(())
}
