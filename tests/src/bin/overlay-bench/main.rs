//! `overlay-bench`: our eBPF datapath against flannel's backends, side by side in one run, on
//! the same two-host lab (hosts joined by a direct veth underlay, one container per host).
//!
//! Per backend and round, on a fresh lab, container to container (c1 client, c2 server): TCP
//! throughput with 1 and 4 streams, 64-byte UDP packets per second received, ping RTT p50/p99
//! and a finer UDP request/response RTT p50/p99,
//! and machine CPU time per gigabit moved in the 1-stream TCP test. Backends are interleaved
//! and rounds repeated so slow drift of a shared machine hits all of them alike; the table shows
//! medians with their ratio to host-gw and to flannel's udp design (userspace-udp), and min-max
//! spreads. Every raw figure goes to a JSON file, the ratios to an SVG chart.
//!
//! The `underlay` backend runs the same tests host to host over the underlay link with no
//! overlay at all: the ceiling every overlay is measured under.
//!
//! The baselines (host-gw, kernel-vxlan, userspace-udp) are programmed as flannel programs
//! them, with each host's peer entries written directly. Our eBPF backends run as users run
//! them: etcd (Debian's) in host1's namespace on its underlay address, the network config
//! written to it as flannel users write it (`{"Network":"10.244.0.0/16","SubnetLen":24,
//! "Backend":{"Type":"vxlan"}}`, or "udp"), and `overlay agent` on each host against it. The
//! containers exist before the agents, on the static subnets; each agent's subnet file is
//! pre-seeded with its host's subnet, which the agent reuses as flanneld does, and the bench
//! checks that it did. Before measuring, it waits until each agent has the other host as a
//! peer and, with TC decap, until both agents' once-a-second tick has put the bridge program on
//! `docker0` and copied the container's MAC (`bridge_redirect` counting on both hosts), so no
//! measurement starts on the slow path. etcd, the agents and their files go with the round's
//! lab on every path, errors and Ctrl-C included.
//!
//! Modules: `options` (flags, backends), `topology` (the lab per backend), the measurements
//! `tcp`, `udp`, `rtt` and `cpu`, then `report` (summary line, JSON, tables) and `chart` (SVG).

mod chart;
mod cpu;
mod options;
mod report;
mod rtt;
mod tcp;
mod topology;
mod udp;

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::{Context as _, bail};
use overlay_tests::{etcd::ETCD_BIN, lab, traffic};
use serde_json::{Value, json};

use crate::{
    chart::chart_svg,
    cpu::BpfStatsEnabled,
    options::{BenchBackend, Options, USAGE, Underlay, parse_args},
    report::{report_json, summary_line, write_tables},
    rtt::{PINGS, RR_ROUND_TRIPS, measure_rr, measure_rtt},
    tcp::{STREAMS, measure_tcp},
    topology::Topology,
    udp::measure_udp,
};

/// Set by SIGINT/SIGTERM: the run stops after the current measurement and cleans up.
static STOP: AtomicBool = AtomicBool::new(false);

fn main() -> anyhow::Result<()> {
    if std::env::args().skip(1).any(|a| a == "--control-plane") {
        // The control-plane bench is its own binary, next to this one.
        use std::os::unix::process::CommandExt as _;
        let bin = lab::workspace_bin("overlay-bench-cp");
        let err = Command::new(&bin).args(std::env::args().skip(1)).exec();
        bail!("running {}: {err}", bin.display());
    }
    let Some(opts) = parse_args()? else {
        println!("{USAGE}");
        return Ok(());
    };
    preflight(&opts)?;
    install_stop_handler()?;
    let _bpf_stats = if opts.bpf_stats {
        Some(BpfStatsEnabled::enable()?)
    } else {
        None
    };

    println!(
        "overlay-bench: {} underlay, {} round(s), {} s per iperf3 measurement, {PINGS} pings back to back, {RR_ROUND_TRIPS} UDP round trips; kernel {}, {} CPUs, load {}",
        opts.underlay.name(),
        opts.rounds,
        opts.duration,
        read_trimmed("/proc/sys/kernel/osrelease"),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        read_trimmed("/proc/loadavg"),
    );
    let mut runs: Vec<Vec<Value>> = vec![Vec::new(); opts.backends.len()];
    'rounds: for round in 0..opts.rounds {
        // Rotate the order each round: no backend always runs first (on a cold machine) or last.
        for k in 0..opts.backends.len() {
            if STOP.load(Ordering::Relaxed) {
                break 'rounds;
            }
            let i = (k + round) % opts.backends.len();
            let backend = opts.backends[i];
            let started = Instant::now();
            let run = run_backend(backend, round + 1, &opts);
            println!(
                "round {}/{} {:<20} {} ({:.0} s)",
                round + 1,
                opts.rounds,
                backend.name(),
                summary_line(&run),
                started.elapsed().as_secs_f64()
            );
            runs[i].push(run);
        }
    }
    if STOP.load(Ordering::Relaxed) {
        eprintln!("overlay-bench: interrupted; reporting what was measured");
    }

    let report = report_json(&opts, &runs);
    let mut tables = String::new();
    write_tables(&mut tables, &opts, &report)?;
    print!("{tables}");
    if let Some(dir) = opts.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    println!("raw figures: {}", opts.json.display());
    if let Some(dir) = opts.svg.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&opts.svg, chart_svg(&report)).with_context(|| format!("writing {}", opts.svg.display()))?;
    println!("chart: {}", opts.svg.display());
    let failed = runs
        .iter()
        .flatten()
        .filter(|r| !r["errors"].as_array().is_none_or(Vec::is_empty))
        .count();
    if failed > 0 {
        bail!(
            "{failed} backend run(s) had errors (see above and {})",
            opts.json.display()
        );
    }
    Ok(())
}

/// Fail early, naming what is missing, rather than half-way through a run.
fn preflight(opts: &Options) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("overlay-bench needs root: it creates network namespaces and loads eBPF programs");
    }
    for (tool, package) in [
        ("iperf3", "iperf3"),
        ("ping", "iputils-ping"),
        ("ip", "iproute2"),
        ("ss", "iproute2"),
    ] {
        if Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            bail!("{tool} not found: apt-get install {package}");
        }
    }
    if opts.backends.iter().any(|b| b.agent().is_some()) {
        let bin = lab::workspace_bin("overlay");
        if !bin.exists() {
            bail!("{} not found: build it first (cargo build --release)", bin.display());
        }
        if !Path::new(ETCD_BIN).exists() {
            bail!(
                "{ETCD_BIN} not found (the eBPF and -v6 backends run `overlay agent` against etcd): apt-get install etcd-server"
            );
        }
    }
    if opts.bpf_stats
        && Command::new("bpftool")
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
    {
        bail!("--bpf-stats needs bpftool: apt-get install bpftool");
    }
    Ok(())
}

fn install_stop_handler() -> anyhow::Result<()> {
    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, Ordering::Relaxed);
    }
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// One backend, one round: a fresh lab and every measurement. Errors end up in the result's
/// `errors`, so one broken backend does not hide the figures of the others.
fn run_backend(backend: BenchBackend, round: usize, opts: &Options) -> Value {
    let mut run =
        json!({ "backend": backend.name(), "round": round, "container_mtu": backend.container_mtu(), "errors": [] });
    let mut errors = Vec::new();
    let setup = Instant::now();
    match Topology::build(backend, opts.underlay) {
        // Ctrl-C reaches etcd and the agents too: their exit is not the error to report.
        Err(_) if STOP.load(Ordering::Relaxed) => errors.push("interrupted during setup".into()),
        Err(e) => errors.push(format!("setup: {e:#}")),
        Ok(mut topo) => {
            // For the eBPF backends this includes etcd, the agents and the wait for them.
            run["setup_s"] = json!(setup.elapsed().as_secs_f64());
            if backend.ebpf().is_some() {
                run["xdp_mode"] = json!(topo.xdp_modes());
                let described: Vec<&Value> = topo.datapaths.iter().map(|p| &p.ready["backend"]).collect();
                run["agent_backend"] = json!(described);
            }
            measure_all(&topo, opts, &mut run, &mut errors);
            if !topo.forwarders.is_empty() {
                let counters: Vec<_> = topo.forwarders.drain(..).map(|f| f.counters()).collect();
                run["forwarder_counters"] = json!(counters);
            }
            if !topo.datapaths.is_empty() {
                match topo.stop_datapaths() {
                    Ok(counters) => run["datapath_counters"] = json!(counters),
                    Err(e) => errors.push(format!("stopping the agents: {e:#}")),
                }
            }
        }
    }
    run["errors"] = json!(errors);
    run
}

/// A setup that cannot carry traffic for a reason outside this benchmark: reported as a note,
/// not a failure.
fn known_limitation(backend: BenchBackend, underlay: Underlay) -> Option<&'static str> {
    (backend == BenchBackend::EbpfVxlanGeneric && underlay == Underlay::Veth).then_some(
        "generic XDP does not run on skbs that a TC program redirected (skb->redirected), and \
         that flag survives a bare veth from host1's TC encap to host2: tunnel packets reach \
         the stack undecapsulated (UdpNoPorts). Measure it with --underlay bridge",
    )
}

type Step<'a> = dyn Fn(&mut Value) -> anyhow::Result<()> + 'a;

fn measure_all(topo: &Topology, opts: &Options, run: &mut Value, errors: &mut Vec<String>) {
    let (c1, c2) = (topo.client(), topo.server());
    // Also warms ARP and neighbour caches, so the RTT figures start hot.
    match traffic::ping(c1.ns, c2.ip, 5, 56, false, "0.05") {
        Ok(r) if r.received > 0 => {}
        Ok(r) => {
            let what = format!(
                "no connectivity {} -> {}: {}/{} pings answered",
                c1.ip, c2.ip, r.received, r.transmitted
            );
            match known_limitation(topo.backend, opts.underlay) {
                Some(why) => run["note"] = json!(format!("{what}: known limitation: {why}")),
                None => errors.push(what),
            }
            return;
        }
        Err(e) => {
            errors.push(format!("ping {} -> {}: {e:#}", c1.ip, c2.ip));
            return;
        }
    }
    let steps: [(&str, &Step); 5] = [
        ("ping", &|run| measure_rtt(c1, c2, run)),
        ("udp-rr", &|run| measure_rr(c1, c2, run)),
        ("tcp1", &|run| measure_tcp(topo, opts, 1, run)),
        ("tcp4", &|run| measure_tcp(topo, opts, STREAMS, run)),
        ("udp64", &|run| measure_udp(c1, c2, opts, run)),
    ];
    for (name, step) in steps {
        if STOP.load(Ordering::Relaxed) {
            errors.push("interrupted".into());
            return;
        }
        if let Err(e) = step(run) {
            errors.push(format!("{name}: {e:#}"));
        }
    }
}
