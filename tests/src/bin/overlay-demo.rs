//! `cargo xtask run`: a multi-host overlay network on one machine. Hosts are network
//! namespaces on an underlay switch, each with a docker0-like bridge and containers; every
//! container pings every other one across hosts and the result is printed as a table.
use anyhow::Context as _;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use overlay_tests::{
    lab::{self, Backend},
    traffic::ping,
};

#[derive(Parser)]
#[command(name = "overlay-demo", about = "A multi-host overlay network in network namespaces")]
struct Args {
    /// Tunnel format.
    #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "udp"])]
    backend: String,
    /// Number of hosts.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=50))]
    hosts: u8,
    /// Containers per host.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=20))]
    containers: u8,
    /// Leave everything up on exit (namespaces stay; remove them with `ip netns del`).
    #[arg(long)]
    keep: bool,
    /// Print the table and stop instead of waiting for Ctrl-C.
    #[arg(long)]
    once: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let backend = if args.backend == "udp" {
        Backend::Udp
    } else {
        Backend::Vxlan
    };
    // Ctrl-C must reach our drops, not kill us mid-way: take the signals as data.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;

    println!(
        "creating {} hosts with {} containers each ({} backend)...",
        args.hosts,
        args.containers,
        backend.name()
    );
    let lab = lab::static_lab(args.hosts as usize, args.containers as usize, backend)?;
    let procs = lab::start_static_datapaths_opts(&lab, backend, !args.keep)?;

    println!();
    println!(
        "{:<7} {:<16} {:<16} {:<6} {:<18} {:>5}",
        "host", "subnet", "PublicIP", "peers", "VtepMAC", "MTU"
    );
    for (h, p) in lab.hosts.iter().zip(&procs) {
        println!(
            "{:<7} {:<16} {:<16} {:<6} {:<18} {:>5}",
            h.name(),
            h.subnet.map(|s| s.to_string()).unwrap_or_default(),
            h.public_ip,
            lab.hosts.len() - 1,
            p.ready["vtep_mac"].as_str().unwrap_or(""),
            p.ready["mtu"]
        );
    }

    println!();
    println!("{:<24} {:<24} {:>8} {:>10}", "from", "to", "replies", "rtt avg");
    let mut failures = 0;
    for a in &lab.hosts {
        for ca in &a.containers {
            for b in lab.hosts.iter().filter(|b| b.index != a.index) {
                for cb in &b.containers {
                    let r = ping(&ca.ns, cb.ip, 3, 56, false, "0.05")?;
                    let avg = if r.rtts_ms.is_empty() {
                        f64::NAN
                    } else {
                        r.rtts_ms.iter().sum::<f64>() / r.rtts_ms.len() as f64
                    };
                    if r.received != r.transmitted {
                        failures += 1;
                    }
                    println!(
                        "{:<24} {:<24} {:>8} {:>8.3}ms",
                        format!("{} {}", a.name(), ca.ip),
                        format!("{} {}", b.name(), cb.ip),
                        format!("{}/{}", r.received, r.transmitted),
                        avg
                    );
                }
            }
        }
    }
    println!();
    println!(
        "{}",
        if failures == 0 {
            "all container pairs reachable".to_string()
        } else {
            format!("{failures} pairs lost pings")
        }
    );

    let explore = format!(
        "ip netns exec {} ping {}",
        lab.hosts[0].containers[0].ns.name(),
        lab.hosts[1].containers[0].ip
    );
    if args.keep {
        // Leave everything running: the namespaces, and the datapath processes in them.
        println!("left up (--keep); explore with e.g. `{explore}`; remove with `ip netns del` on each namespace");
        for p in procs {
            std::mem::forget(p);
        }
        std::mem::forget(lab);
        return if failures == 0 {
            Ok(())
        } else {
            anyhow::bail!("{failures} container pairs could not reach each other")
        };
    }
    if !args.once {
        println!("running; explore with e.g. `{explore}`; Ctrl-C to stop and remove everything");
        signals.wait()?;
    }

    println!();
    println!("{:<7} counters", "host");
    for (h, p) in lab.hosts.iter().zip(procs) {
        let stats = p.stop().with_context(|| format!("stopping {}", h.name()))?;
        let nonzero: Vec<String> = stats["counters"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| v["packets"].as_u64().unwrap_or(0) > 0)
                    .map(|(k, v)| format!("{k}={}", v["packets"]))
                    .collect()
            })
            .unwrap_or_default();
        println!("{:<7} {}", h.name(), nonzero.join(" "));
    }
    if failures > 0 {
        anyhow::bail!("{failures} container pairs could not reach each other");
    }
    Ok(())
}
