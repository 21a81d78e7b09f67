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
use std::{
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnetwork::Ipv4Network;
use overlay::backend::tun_udp::{DEFAULT_PORT as TUN_UDP_PORT, ENCAP_OVERHEAD, TunUdp, TunUdpSpec};
use overlay_tests::{
    cluster::HEALTHZ_PORT,
    etcd::{ETCD_BIN, Etcd},
    lab::{self, Backend, Lab, OverlayProcess},
    netns::Netns,
    traffic,
};
use serde_json::{Value, json};

const UNDERLAY_MTU: u32 = 1500;
const IPERF_PORT: u16 = 5201;
/// UDP payload of the packet-rate test: the classic small-packet figure.
const UDP_PAYLOAD: u64 = 64;
/// Port of the packet-rate test's receiver.
const UDP_PORT: u16 = 5301;
/// Sender threads (one flow each) of the packet-rate test: one per CPU, so the sender is not
/// what limits the rate.
const UDP_SENDERS: usize = 2;
/// Datagrams per sendmmsg/recvmmsg call.
const UDP_BATCH: usize = 64;
/// Streams for the multi-stream TCP test.
const STREAMS: u32 = 4;
const PINGS: u32 = 5000;
/// Back to back (root only): the next ping leaves when the reply is in, so the figure is the
/// path's latency. At 10 ms the CPUs fall idle between pings and the wake-up, tens of
/// microseconds that vary from run to run, drowned the difference between paths.
const PING_INTERVAL: &str = "0";
/// UDP request/response round trips (64-byte datagram each way, one in flight), timed in
/// nanoseconds: ping prints whole microseconds, too coarse for paths of a few microseconds.
/// Both ends spin on non-blocking sockets, so no thread wake-up is timed, only the path.
const RR_ROUND_TRIPS: u32 = 20_000;
const RR_PORT: u16 = 5401;
/// The overlay network of every backend; each host's subnet is `lab::static_subnet(i)` in it.
const NETWORK: &str = "10.244.0.0/16";
/// How long an agent has to print its ready line (etcd, lease, programs loaded and attached).
const AGENT_READY: Duration = Duration::from_secs(30);
/// How long the agents have to learn each other and to put the bridge program in place.
const AGENT_SETTLE: Duration = Duration::from_secs(20);

const USAGE: &str = "\
overlay-bench: TCP throughput, UDP packet rate, ping and UDP RTT and CPU per Gbit, container to
container, for the underlay alone, host-gw, the kernel vxlan device as flannel configures it,
our eBPF datapath (`overlay agent` on each host, with etcd in the lab), and flannel's udp design
(TUN + UDP socket in user space).

Usage: overlay-bench [--rounds N] [--duration SECS] [--quick] [--json PATH] [--svg PATH]
                     [--backends NAME,NAME,...] [--underlay veth|bridge] [--bpf-stats]
       overlay-bench --control-plane ...   (see overlay-bench-cp --help)

  --rounds N        rounds over all backends, each on a fresh lab (default 3)
  --duration SECS   length of each throughput and packet-rate measurement (default 5)
  --quick           smoke run: 1 round of 2 s measurements
  --json PATH       raw per-round figures (default target/bench/datapath.json)
  --svg PATH        chart of the ratios to host-gw (default target/bench/datapath.svg)
  --backends LIST   subset, in this order (default: all):
                    underlay,host-gw,kernel-vxlan,ebpf-vxlan,ebpf-udp,userspace-udp,
                    ebpf-vxlan-xdp,ebpf-vxlan-generic
                    (ebpf-*: TC ingress decap on veth, the default; -xdp: native XDP
                    decap; -generic: generic XDP decap)
  --underlay KIND   veth: the hosts' eth0 are the two ends of one veth (default);
                    bridge: each host's eth0 is a port of a bridge, a switch between them
  --bpf-stats       enable kernel.bpf_stats_enabled during the run and record the run time
                    of our programs in the 1-stream TCP test (costs some ns per packet)

Needs root, iperf3 and ping, the `overlay` binary next to this one (cargo build --release) and,
for the eBPF backends, Debian's etcd (apt-get install etcd-server).
The 64-byte test uses its own senders (sendmmsg, one thread per CPU) and receiver (recvmmsg),
since iperf3 before 3.16 sends from one thread and is slower than the paths it measures.";

/// Set by SIGINT/SIGTERM: the run stops after the current measurement and cleans up.
static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BenchBackend {
    /// No overlay: host to host over the underlay link, the ceiling.
    Underlay,
    HostGw,
    KernelVxlan,
    EbpfVxlan,
    EbpfUdp,
    /// flannel's udp backend design: our TUN + UDP socket forwarder in this process.
    UserspaceUdp,
    /// Our vxlan datapath decapsulating in native XDP instead of TC ingress (the default on veth).
    EbpfVxlanXdp,
    EbpfVxlanGeneric,
}

impl BenchBackend {
    const ALL: [BenchBackend; 8] = [
        BenchBackend::Underlay,
        BenchBackend::HostGw,
        BenchBackend::KernelVxlan,
        BenchBackend::EbpfVxlan,
        BenchBackend::EbpfUdp,
        BenchBackend::UserspaceUdp,
        BenchBackend::EbpfVxlanXdp,
        BenchBackend::EbpfVxlanGeneric,
    ];

    fn name(self) -> &'static str {
        match self {
            BenchBackend::Underlay => "underlay",
            BenchBackend::HostGw => "host-gw",
            BenchBackend::KernelVxlan => "kernel-vxlan",
            BenchBackend::EbpfVxlan => "ebpf-vxlan",
            BenchBackend::EbpfUdp => "ebpf-udp",
            BenchBackend::UserspaceUdp => "userspace-udp",
            BenchBackend::EbpfVxlanXdp => "ebpf-vxlan-xdp",
            BenchBackend::EbpfVxlanGeneric => "ebpf-vxlan-generic",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        Self::ALL.into_iter().find(|b| b.name() == s).with_context(|| {
            let names: Vec<_> = Self::ALL.iter().map(|b| b.name()).collect();
            format!("unknown backend {s:?}: expected one of {}", names.join(", "))
        })
    }

    /// Our datapath's format and the extra flags it runs with, for the eBPF variants.
    fn ebpf(self) -> Option<(Backend, &'static [&'static str])> {
        match self {
            BenchBackend::Underlay | BenchBackend::HostGw | BenchBackend::KernelVxlan | BenchBackend::UserspaceUdp => {
                None
            }
            // No --decap or --xdp-mode: what users get by default (TC ingress decap on a veth
            // underlay, native XDP where the driver has it).
            BenchBackend::EbpfVxlan => Some((Backend::Vxlan, &[])),
            BenchBackend::EbpfUdp => Some((Backend::Udp, &[])),
            BenchBackend::EbpfVxlanXdp => Some((Backend::Vxlan, &["--decap", "xdp"])),
            BenchBackend::EbpfVxlanGeneric => Some((Backend::Vxlan, &["--decap", "xdp", "--xdp-mode", "generic"])),
        }
    }

    /// Container MTU = overlay MTU, as flannel hands it to docker.
    fn container_mtu(self) -> u32 {
        match self {
            BenchBackend::Underlay | BenchBackend::HostGw => UNDERLAY_MTU,
            BenchBackend::KernelVxlan => UNDERLAY_MTU - 50,
            BenchBackend::UserspaceUdp => UNDERLAY_MTU - ENCAP_OVERHEAD,
            b => UNDERLAY_MTU - b.ebpf().expect("eBPF backend").0.overhead(),
        }
    }
}

/// The figures of the table, in column order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metric {
    Tcp1,
    Tcp4,
    Udp64,
    RttP50,
    RttP99,
    RrP50,
    RrP99,
    CpuPerGbit,
}

impl Metric {
    const ALL: [Metric; 8] = [
        Metric::Tcp1,
        Metric::Tcp4,
        Metric::Udp64,
        Metric::RttP50,
        Metric::RttP99,
        Metric::RrP50,
        Metric::RrP99,
        Metric::CpuPerGbit,
    ];

    /// Whether a bigger figure is better (throughput) or worse (latency, cost).
    fn higher_is_better(self) -> bool {
        matches!(self, Metric::Tcp1 | Metric::Tcp4 | Metric::Udp64)
    }

    /// Label in the chart.
    fn label(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP 1 stream",
            Metric::Tcp4 => "TCP 4 streams",
            Metric::Udp64 => "UDP 64 B pps",
            Metric::RttP50 => "ping RTT p50",
            Metric::RttP99 => "ping RTT p99",
            Metric::RrP50 => "UDP RTT p50",
            Metric::RrP99 => "UDP RTT p99",
            Metric::CpuPerGbit => "CPU s per Gbit",
        }
    }

    /// Column header, with the unit the table shows.
    fn header(self) -> &'static str {
        match self {
            Metric::Tcp1 => "tcp1 Gbit/s",
            Metric::Tcp4 => "tcp4 Gbit/s",
            Metric::Udp64 => "udp64 kpps",
            Metric::RttP50 => "ping p50 us",
            Metric::RttP99 => "ping p99 us",
            Metric::RrP50 => "udp rtt p50 us",
            Metric::RrP99 => "udp rtt p99 us",
            Metric::CpuPerGbit => "cpu s/Gbit",
        }
    }

    /// Key in the JSON, with the unit the raw figure is in.
    fn key(self) -> &'static str {
        match self {
            Metric::Tcp1 => "tcp1_bps",
            Metric::Tcp4 => "tcp4_bps",
            Metric::Udp64 => "udp64_rx_pps",
            Metric::RttP50 => "rtt_p50_us",
            Metric::RttP99 => "rtt_p99_us",
            Metric::RrP50 => "udp_rr_p50_us",
            Metric::RrP99 => "udp_rr_p99_us",
            Metric::CpuPerGbit => "tcp1_cpu_s_per_gbit",
        }
    }

    /// Raw figure to the table's unit.
    fn scale(self) -> f64 {
        match self {
            Metric::Tcp1 | Metric::Tcp4 => 1e-9,
            Metric::Udp64 => 1e-3,
            Metric::RttP50 | Metric::RttP99 | Metric::RrP50 | Metric::RrP99 | Metric::CpuPerGbit => 1.0,
        }
    }
}

/// How the two hosts are joined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Underlay {
    /// One veth pair, host1's eth0 to host2's eth0: the fewest hops.
    Veth,
    /// Each host on a port of a bridge. Needed for generic XDP on the receiver: a frame that a
    /// TC program on host1 redirected keeps skb->redirected across a bare veth, and generic
    /// XDP passes such skbs by unseen; a bridge port's receive clears the flag, as a wire does.
    Bridge,
}

impl Underlay {
    fn name(self) -> &'static str {
        match self {
            Underlay::Veth => "veth",
            Underlay::Bridge => "bridge",
        }
    }
}

struct Options {
    underlay: Underlay,
    rounds: usize,
    duration: u64,
    json: PathBuf,
    svg: PathBuf,
    backends: Vec<BenchBackend>,
    bpf_stats: bool,
}

fn parse_args() -> anyhow::Result<Option<Options>> {
    let mut o = Options {
        underlay: Underlay::Veth,
        rounds: 3,
        duration: 5,
        json: PathBuf::from("target/bench/datapath.json"),
        svg: PathBuf::from("target/bench/datapath.svg"),
        backends: BenchBackend::ALL.to_vec(),
        bpf_stats: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().with_context(|| format!("{flag} needs a value\n\n{USAGE}"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--rounds" => o.rounds = value("--rounds")?.parse().context("--rounds: not a number")?,
            "--duration" => {
                o.duration = value("--duration")?
                    .parse()
                    .context("--duration: not a number of seconds")?
            }
            "--quick" => (o.rounds, o.duration) = (1, 2),
            "--json" => o.json = value("--json")?.into(),
            "--svg" => o.svg = value("--svg")?.into(),
            "--backends" => {
                o.backends = value("--backends")?
                    .split(',')
                    .map(BenchBackend::parse)
                    .collect::<anyhow::Result<_>>()?
            }
            "--underlay" => {
                o.underlay = match value("--underlay")?.as_str() {
                    "veth" => Underlay::Veth,
                    "bridge" => Underlay::Bridge,
                    other => bail!("--underlay {other:?}: expected veth or bridge"),
                }
            }
            "--bpf-stats" => o.bpf_stats = true,
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    if o.rounds == 0 || o.duration == 0 || o.backends.is_empty() {
        bail!("--rounds, --duration and --backends must not be zero or empty");
    }
    Ok(Some(o))
}

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
            let run = run_backend(backend, &opts);
            println!(
                "round {}/{} {:<20} {} ({:.0} s)",
                round + 1,
                opts.rounds,
                backend.name(),
                summary_line(&run),
                started.elapsed().as_secs_f64()
            );
            let mut run = run;
            run["round"] = json!(round + 1);
            runs[i].push(run);
        }
    }
    if STOP.load(Ordering::Relaxed) {
        eprintln!("overlay-bench: interrupted; reporting what was measured");
    }

    let report = report_json(&opts, &runs);
    print_tables(&opts, &report);
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
    if opts.backends.iter().any(|b| b.ebpf().is_some()) {
        let bin = lab::workspace_bin("overlay");
        if !bin.exists() {
            bail!("{} not found: build it first (cargo build --release)", bin.display());
        }
        if !Path::new(ETCD_BIN).exists() {
            bail!(
                "{ETCD_BIN} not found (the eBPF backends run `overlay agent` against etcd): apt-get install etcd-server"
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

/// One end of a test: a namespace and the address the other end reaches it at.
#[derive(Clone, Copy)]
struct Endpoint<'a> {
    ns: &'a Netns,
    ip: Ipv4Addr,
}

/// Two hosts with one container each, wired for one backend.
struct Topology {
    backend: BenchBackend,
    // Field order is drop order: the agents stop, then etcd and the agents' files go, then the
    // namespaces. `build` fills a Topology in place, so a failed setup unwinds in this order too.
    /// Our `overlay agent` per host, for the eBPF backends.
    datapaths: Vec<OverlayProcess>,
    forwarders: Vec<TunUdp>,
    control: Option<ControlPlane>,
    lab: Lab,
}

/// What the agents run against, held for its drop (etcd stopped, its data and the files
/// removed): etcd in host1's namespace and a directory of per-host files (subnet files, bpffs
/// pin directories).
struct ControlPlane {
    _etcd: Etcd,
    _dir: tempfile::TempDir,
}

impl Topology {
    fn build(backend: BenchBackend, underlay: Underlay) -> anyhow::Result<Self> {
        // Lab joins two hosts by a bare veth and more by a bridge: for the bridge, a third
        // host is made and removed at once, which leaves its switch port unused.
        let n = match underlay {
            Underlay::Veth => 2,
            Underlay::Bridge => 3,
        };
        let mut lab = Lab::new(n, UNDERLAY_MTU).context("creating the lab")?;
        lab.hosts.truncate(2);
        for h in lab.hosts.iter_mut() {
            h.add_containers(lab::static_subnet(h.index), backend.container_mtu(), 1)
                .with_context(|| format!("adding a container to host{}", h.index))?;
        }
        let mut topo = Topology {
            backend,
            datapaths: Vec::new(),
            forwarders: Vec::new(),
            control: None,
            lab,
        };
        let lab = &topo.lab;
        match backend {
            BenchBackend::Underlay => {}
            BenchBackend::UserspaceUdp => {
                // As tun_udp_e2e starts it: device, address, route and socket made by a thread
                // inside the host's namespace; the forwarding threads run in this process.
                for h in &lab.hosts {
                    let spec = TunUdpSpec {
                        device: "flannel0".into(),
                        public_ip: h.public_ip,
                        port: TUN_UDP_PORT,
                        subnet: lab::static_subnet(h.index),
                        network: NETWORK.parse().expect("valid"),
                        mtu: backend.container_mtu(),
                    };
                    let forwarder =
                        h.ns.spawn(move || TunUdp::start(spec))
                            .join()
                            .map_err(|_| anyhow::anyhow!("TunUdp start thread panicked"))??
                            .with_context(|| format!("starting the udp forwarder on {}", h.name()))?;
                    for peer in lab.hosts.iter().filter(|p| p.index != h.index) {
                        forwarder.upsert_peer(lab::static_subnet(peer.index), peer.public_ip);
                    }
                    topo.forwarders.push(forwarder);
                }
            }
            BenchBackend::HostGw => {
                // flannel's host-gw: a plain route to each peer's subnet via its PublicIP.
                for h in &lab.hosts {
                    for peer in lab.hosts.iter().filter(|p| p.index != h.index) {
                        let subnet = lab::static_subnet(peer.index).to_string();
                        h.ns.ip(&["route", "add", &subnet, "via", &peer.public_ip.to_string()])
                            .with_context(|| format!("host-gw route on {}", h.name()))?;
                    }
                }
            }
            BenchBackend::KernelVxlan => {
                for h in &lab.hosts {
                    let subnet = lab::static_subnet(h.index);
                    lab::flannel_vxlan_host(
                        &h.ns,
                        &h.iface,
                        h.public_ip,
                        subnet,
                        &lab::static_vtep_mac(h.index),
                        UNDERLAY_MTU,
                    )
                    .with_context(|| format!("flannel.1 on {}", h.name()))?;
                }
                for h in &lab.hosts {
                    for peer in lab.hosts.iter().filter(|p| p.index != h.index) {
                        let mac = lab::static_vtep_mac(peer.index);
                        lab::flannel_vxlan_add_peer(&h.ns, lab::static_subnet(peer.index), peer.public_ip, &mac)
                            .with_context(|| format!("flannel.1 peer entries on {}", h.name()))?;
                    }
                }
            }
            _ => topo.start_agents()?,
        }
        Ok(topo)
    }

    /// etcd in host1's namespace on its underlay address, the network config in it, then
    /// `overlay agent` on each host, each made to lease the static subnet its container is on.
    fn start_agents(&mut self) -> anyhow::Result<()> {
        let (format, extra) = self.backend.ebpf().expect("eBPF backend");
        let h1 = &self.lab.hosts[0];
        let etcd = Etcd::try_start_in_netns(h1.ns.name(), h1.public_ip).context("starting etcd in host1")?;
        let dir = tempfile::Builder::new()
            .prefix("overlay-bench-")
            .tempdir()
            .context("creating a directory for the agents' files")?;
        let endpoint = etcd.endpoint();
        let dir_path = dir.path().to_path_buf();
        self.control = Some(ControlPlane { _etcd: etcd, _dir: dir });
        let overlay = lab::workspace_bin("overlay");
        overlay_tests::netns::run(
            h1.ns
                .command(overlay.to_str().context("non-UTF-8 path of the overlay binary")?)
                .args(["config", "set", "--etcd-endpoints", &endpoint, &network_config(format)]),
        )
        .context("writing the network config to etcd")?;

        for h in &self.lab.hosts {
            let subnet = lab::static_subnet(h.index);
            let host_dir = dir_path.join(h.name());
            std::fs::create_dir_all(&host_dir).with_context(|| format!("creating {}", host_dir.display()))?;
            // The agent reuses the subnet its subnet file names, as flanneld does after a
            // restart: this is how it comes to lease the subnet docker0 was made with.
            let subnet_file = host_dir.join("subnet.env");
            std::fs::write(&subnet_file, seeded_subnet_file(subnet, self.backend.container_mtu()))
                .with_context(|| format!("writing {}", subnet_file.display()))?;
            // A pin directory per host: the agent mounts a bpffs there (inside the private
            // mount namespace `ip netns exec` gives it, so it goes when the agent exits).
            let args = agent_args(&endpoint, &h.iface, &subnet_file, &host_dir.join("bpf"), extra);
            let agent = OverlayProcess::start(&h.ns, &args, AGENT_READY)
                .with_context(|| format!("starting `overlay agent` on {}", h.name()))?;
            let leased = agent.ready["subnet"].as_str().unwrap_or("none").to_string();
            let mtu = agent.ready["mtu"].as_u64();
            self.datapaths.push(agent);
            if leased != subnet.to_string() {
                bail!(
                    "the agent on {} leased {leased}, not {subnet}, the subnet its container is on \
                     (pre-seeded in {}): the bench needs the agent to reuse the subnet of its subnet file",
                    h.name(),
                    subnet_file.display()
                );
            }
            if mtu != Some(self.backend.container_mtu().into()) {
                bail!(
                    "the agent on {} reports MTU {mtu:?}; the container was made with {}",
                    h.name(),
                    self.backend.container_mtu()
                );
            }
        }
        self.wait_agents_settled()
    }

    /// Wait until each agent has the other host as a peer and, with TC decap, until its tick
    /// has attached the bridge program and copied the container's MAC: frames then leave
    /// `docker0` straight for the container's port (`bridge_redirect`), as they will for the
    /// whole measurement.
    fn wait_agents_settled(&self) -> anyhow::Result<()> {
        let hosts = &self.lab.hosts;
        wait_until("each agent has the other host as a peer", AGENT_SETTLE, || {
            for h in hosts {
                let peers = agent_peers(&h.ns)?;
                for other in hosts.iter().filter(|o| o.index != h.index) {
                    let want = lab::static_subnet(other.index).to_string();
                    if !peers.contains(&want) {
                        bail!("{}'s agent has peers {peers:?}, not yet {want}", h.name());
                    }
                }
            }
            Ok(())
        })?;
        let modes = self.xdp_modes();
        if !modes.iter().any(|m| m == "tc") {
            // XDP decap: no bridge program (the decapsulated skb carries no tunnel marking).
            return Ok(());
        }
        wait_until(
            "the agents' bridge program hands frames to the container ports",
            AGENT_SETTLE,
            || {
                for (from, to) in [(0, 1), (1, 0)] {
                    let (c_from, c_to) = (&hosts[from].containers[0], &hosts[to].containers[0]);
                    traffic::ping(&c_from.ns, c_to.ip, 2, 56, false, "0.05")?;
                }
                let mut redirected = Vec::new();
                for (agent, mode) in self.datapaths.iter().zip(&modes) {
                    let n = agent.counters()?["counters"]["bridge_redirect"]["packets"]
                        .as_u64()
                        .unwrap_or(0);
                    redirected.push((mode == "tc").then_some(n));
                }
                if redirected.iter().flatten().any(|&n| n == 0) {
                    bail!("bridge_redirect packets per host (none: XDP decap): {redirected:?}");
                }
                Ok(())
            },
        )?;
        Ok(())
    }

    /// Where traffic starts: c1, or host1 itself for the bare underlay.
    fn client(&self) -> Endpoint<'_> {
        self.endpoint(0)
    }

    fn server(&self) -> Endpoint<'_> {
        self.endpoint(1)
    }

    fn endpoint(&self, host: usize) -> Endpoint<'_> {
        let h = &self.lab.hosts[host];
        match self.backend {
            BenchBackend::Underlay => Endpoint {
                ns: &h.ns,
                ip: h.public_ip,
            },
            _ => Endpoint {
                ns: &h.containers[0].ns,
                ip: h.containers[0].ip,
            },
        }
    }

    /// Decap hook per host as the agent reported it: "tc", or the XDP attach mode ("Driver" =
    /// native, "Skb" = generic), the words the table and earlier JSON use.
    fn xdp_modes(&self) -> Vec<String> {
        self.datapaths
            .iter()
            .map(|p| decap_mode(p.ready["backend"].as_str().unwrap_or_default()).unwrap_or_else(|| "?".into()))
            .collect()
    }

    /// Stop the agents and return their final counters, host by host.
    fn stop_datapaths(&mut self) -> anyhow::Result<Vec<Value>> {
        self.datapaths.drain(..).map(|p| p.stop()).collect()
    }
}

/// The network config as flannel users write it, for our format.
fn network_config(format: Backend) -> String {
    format!(
        r#"{{"Network":"{NETWORK}","SubnetLen":24,"Backend":{{"Type":"{}"}}}}"#,
        format.name()
    )
}

/// A subnet file as the agent (and flanneld) writes it for `subnet`: what a host has after a
/// previous run, and where the agent looks for the subnet to ask for again.
fn seeded_subnet_file(subnet: Ipv4Network, mtu: u32) -> String {
    let first = Ipv4Addr::from(u32::from(subnet.network()) + 1);
    format!(
        "FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={first}/{}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=false\n",
        subnet.prefix()
    )
}

/// The flags of `overlay agent` on one host: flanneld's, our per-host paths, /status on the
/// host's loopback for the wait, then the backend's own (`--decap`, `--xdp-mode`).
/// `--datapath ebpf`: fail rather than measure the kernel fallback. No FORWARD rules: the
/// hosts' FORWARD policy is ACCEPT, and the baselines get none either (netfilter hooks in the
/// path would cost our backends alone).
fn agent_args(endpoint: &str, iface: &str, subnet_file: &Path, pin_dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "agent".into(),
        format!("--etcd-endpoints={endpoint}"),
        format!("--iface={iface}"),
        format!("--subnet-file={}", subnet_file.display()),
        format!("--pin-dir={}", pin_dir.display()),
        "--healthz-ip=127.0.0.1".into(),
        format!("--healthz-port={HEALTHZ_PORT}"),
        "--datapath=ebpf".into(),
        "--iptables-forward-rules=false".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Peer subnets of the agent in `ns`, from its /status.
fn agent_peers(ns: &Netns) -> anyhow::Result<Vec<String>> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, HEALTHZ_PORT));
    let body = ns
        .spawn(move || overlay::cli::status::http_get(addr, "/status"))
        .join()
        .map_err(|_| anyhow::anyhow!("/status thread panicked"))???;
    let status: Value = serde_json::from_str(&body).context("unreadable /status")?;
    Ok(status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["subnet"].as_str().map(String::from))
        .collect())
}

/// The decap hook in the `backend` of an agent's ready line ("ebpf-vxlan (decap tc, device
/// ovl0)", "... (decap xdp driver, ...)", "... (decap xdp skb, ...)"), in the words of the
/// static datapath's ready line: "tc", or the XDP attach mode "Driver" or "Skb".
fn decap_mode(backend: &str) -> Option<String> {
    let mode = backend.split_once("(decap ")?.1.split([',', ')']).next()?.trim();
    Some(match mode {
        "xdp driver" => "Driver".into(),
        "xdp skb" => "Skb".into(),
        other => other.into(),
    })
}

/// Poll `check` until it returns Ok; its error says what is not there yet, and is reported if
/// `timeout` passes first. Stops at once when the run is interrupted.
fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let why = match check() {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if STOP.load(Ordering::Relaxed) {
            bail!("{what}: interrupted");
        }
        if start.elapsed() > timeout {
            bail!("{what}: not after {timeout:?}: {why:#}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One backend, one round: a fresh lab and every measurement. Errors end up in the result's
/// `errors`, so one broken backend does not hide the figures of the others.
fn run_backend(backend: BenchBackend, opts: &Options) -> Value {
    let mut run = json!({ "backend": backend.name(), "container_mtu": backend.container_mtu(), "errors": [] });
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

fn measure_rtt(c1: Endpoint, c2: Endpoint, run: &mut Value) -> anyhow::Result<()> {
    let r = traffic::ping(c1.ns, c2.ip, PINGS, 56, false, PING_INTERVAL)?;
    let (Some(p50), Some(p99)) = (r.percentile(50.0), r.percentile(99.0)) else {
        bail!("no ping answered ({} sent)", r.transmitted);
    };
    run["rtt_p50_us"] = json!(p50 * 1000.0);
    run["rtt_p99_us"] = json!(p99 * 1000.0);
    run["ping_sent"] = json!(r.transmitted);
    run["ping_received"] = json!(r.received);
    Ok(())
}

fn measure_tcp(topo: &Topology, opts: &Options, streams: u32, run: &mut Value) -> anyhow::Result<()> {
    let (c1, c2) = (topo.client(), topo.server());
    let key = if streams == 1 { "tcp1" } else { "tcp4" };
    let (h1, h2) = (&topo.lab.hosts[0], &topo.lab.hosts[1]);
    let tx_before = link_stats(&h1.ns, &h1.iface, "tx")?;
    let rx_before = link_stats(&h2.ns, &h2.iface, "rx")?;
    let bpf_before = if opts.bpf_stats && streams == 1 {
        Some(bpf_prog_stats()?)
    } else {
        None
    };

    let cpu_before = CpuTimes::read()?;
    let (client, _server) = iperf3(c1, c2, opts.duration, &["-P", &streams.to_string()])?;
    let cpu = CpuTimes::read()?.since(&cpu_before);
    let received = f64_at(&client, "/end/sum_received/bits_per_second")?;
    run[format!("{key}_bps")] = json!(received);
    // Both "hosts" run on this machine's CPUs, so the whole machine's busy time is the cost of
    // moving the bytes (plus whatever else the machine did meanwhile: see the idle figure).
    let gbits = f64_at(&client, "/end/sum_received/bytes")? * 8.0 / 1e9;
    run[format!("{key}_cpu_busy_s")] = json!(cpu.busy_s);
    run[format!("{key}_cpu_window_s")] = json!(cpu.window_s);
    run[format!("{key}_gbits")] = json!(gbits);
    if gbits > 0.0 {
        run[format!("{key}_cpu_s_per_gbit")] = json!(cpu.busy_s / gbits);
    }
    run[format!("{key}_retransmits")] = client
        .pointer("/end/sum_sent/retransmits")
        .cloned()
        .unwrap_or(Value::Null);
    run[format!("{key}_cpu")] = client
        .pointer("/end/cpu_utilization_percent")
        .cloned()
        .unwrap_or(Value::Null);

    // What crossed the underlay: the average skb size tells whether GSO super-packets or
    // wire-sized segments left host1 and reached host2 (a bridge between them may segment).
    let tx_after = link_stats(&h1.ns, &h1.iface, "tx")?;
    let rx_after = link_stats(&h2.ns, &h2.iface, "rx")?;
    for (side, before, after) in [("tx", tx_before, tx_after), ("rx", rx_before, rx_after)] {
        let (packets, bytes) = (after.0 - before.0, after.1 - before.1);
        run[format!("{key}_underlay_{side}")] = json!({
            "packets": packets,
            "bytes": bytes,
            "avg_bytes_per_skb": bytes.checked_div(packets).unwrap_or(0),
            "dropped": after.2 - before.2,
        });
    }
    if let Some(before) = bpf_before {
        run["tcp1_bpf_stats"] = bpf_stats_delta(&before, &bpf_prog_stats()?);
    }
    Ok(())
}

/// 64-byte datagrams from c1 to c2 for the test's duration, as fast as [`UDP_SENDERS`] threads
/// with sendmmsg make them; a receiver thread in c2 counts what arrives with recvmmsg. The send
/// rate and the loss are recorded next to the received rate. Over veth, a kernel path does its
/// work in the sending CPU's softirq, in line with the send: the senders cannot outrun such a
/// path, and the received rate is what the path does per CPU-second on this machine; a path
/// with a queue of its own (the TUN forwarder) drops what it cannot take.
fn measure_udp(c1: Endpoint, c2: Endpoint, opts: &Options, run: &mut Value) -> anyhow::Result<()> {
    let duration = Duration::from_secs(opts.duration);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = {
        let stop = stop.clone();
        c2.ns.spawn(move || udp_receive(ready_tx, &stop))
    };
    let started = ready_rx.recv_timeout(Duration::from_secs(5));
    let sent: anyhow::Result<(u64, f64)> = match started {
        Ok(Ok(())) => {
            let dst = SocketAddr::from((c2.ip, UDP_PORT));
            let senders: Vec<_> = (0..UDP_SENDERS)
                .map(|_| c1.ns.spawn(move || udp_send(dst, duration)))
                .collect();
            // Sum over the senders; the rate's seconds are the longest sender's.
            let mut total = Ok((0u64, 0f64));
            for h in senders {
                let r = h
                    .join()
                    .map_err(|_| anyhow::anyhow!("UDP sender panicked"))
                    .and_then(|r| r)
                    .and_then(|r| r);
                total = match (total, r) {
                    (Ok((n, t)), Ok((n1, t1))) => Ok((n + n1, t.max(t1))),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
            }
            total
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow::anyhow!("the UDP receiver did not start in 5 s")),
    };
    // Packets still queued in the path arrive within a few ms; then the receiver stops.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("UDP receiver panicked"))?
        .and_then(|r| r)
        .context("UDP receiver")?;
    let (sent, send_secs) = sent.context("UDP sender")?;
    if send_secs <= 0.0 || sent == 0 {
        bail!("the UDP sender sent nothing");
    }
    run["udp64_rx_pps"] = json!(received as f64 / send_secs);
    run["udp64_tx_pps"] = json!(sent as f64 / send_secs);
    run["udp64_sent"] = json!(sent);
    run["udp64_received"] = json!(received);
    run["udp64_lost_percent"] = json!(100.0 * sent.saturating_sub(received) as f64 / sent as f64);
    Ok(())
}

fn measure_rr(c1: Endpoint, c2: Endpoint, run: &mut Value) -> anyhow::Result<()> {
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = {
        let stop = stop.clone();
        c2.ns.spawn(move || rr_echo(ready_tx, &stop))
    };
    let times = match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => {
            let dst = SocketAddr::from((c2.ip, RR_PORT));
            c1.ns
                .spawn(move || rr_client(dst))
                .join()
                .map_err(|_| anyhow::anyhow!("UDP RR client panicked"))
                .and_then(|r| r)
                .and_then(|r| r)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow::anyhow!("the UDP echo server did not start in 5 s")),
    };
    stop.store(true, Ordering::Relaxed);
    server
        .join()
        .map_err(|_| anyhow::anyhow!("UDP echo server panicked"))?
        .and_then(|r| r)
        .context("UDP echo server")?;
    let mut times = times.context("UDP RR client")?;
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_nanos() as f64 / 1000.0;
    run["udp_rr_p50_us"] = json!(at(0.50));
    run["udp_rr_p99_us"] = json!(at(0.99));
    run["udp_rr_round_trips"] = json!(times.len());
    Ok(())
}

/// Echo every datagram on [`RR_PORT`] back to its sender until `stop`.
fn rr_echo(ready: std::sync::mpsc::Sender<anyhow::Result<()>>, stop: &AtomicBool) -> anyhow::Result<()> {
    let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, RR_PORT)) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("binding UDP port {RR_PORT}: {e}")));
            return Err(e.into());
        }
    };
    socket.set_nonblocking(true)?;
    let _ = ready.send(Ok(()));
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                socket.send_to(&buf[..n], from)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// [`RR_ROUND_TRIPS`] round trips, one in flight, each timed from send to reply.
fn rr_client(dst: SocketAddr) -> anyhow::Result<Vec<Duration>> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(dst)?;
    socket.set_nonblocking(true)?;
    let payload = [0x5au8; UDP_PAYLOAD as usize];
    let mut buf = [0u8; 2048];
    let mut times = Vec::with_capacity(RR_ROUND_TRIPS as usize);
    for _ in 0..RR_ROUND_TRIPS {
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        let t = Instant::now();
        socket.send(&payload)?;
        loop {
            match socket.recv(&mut buf) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if t.elapsed() > Duration::from_secs(1) {
                        bail!("no reply from {dst} within 1 s");
                    }
                    std::hint::spin_loop();
                }
                Err(e) => return Err(e.into()),
            }
        }
        times.push(t.elapsed());
    }
    if times.is_empty() {
        bail!("no round trip completed");
    }
    Ok(times)
}

/// Bind the receiver, say so on `ready`, count datagrams until `stop`.
fn udp_receive(ready: std::sync::mpsc::Sender<anyhow::Result<()>>, stop: &AtomicBool) -> anyhow::Result<u64> {
    let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, UDP_PORT)) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("binding UDP port {UDP_PORT}: {e}")));
            return Err(e.into());
        }
    };
    // A deep queue absorbs bursts, so drops are the path's, not a slow wake-up of ours.
    set_sockopt_int(&socket, libc::SO_RCVBUF, 8 << 20);
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let _ = ready.send(Ok(()));
    let mut buf = vec![[0u8; 2048]; UDP_BATCH];
    let mut iov: Vec<libc::iovec> = buf
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: all-zero is a valid mmsghdr; each points at its own iovec, which outlives it.
    let mut msgs: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .map(|v| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut received = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: msgs and the buffers they point to are valid for the call.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                UDP_BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            received += n as u64;
        }
    }
    Ok(received)
}

/// Send 64-byte datagrams to `dst` for `duration`; returns (sent, seconds it took).
fn udp_send(dst: SocketAddr, duration: Duration) -> anyhow::Result<(u64, f64)> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket
        .connect(dst)
        .with_context(|| format!("connecting a UDP socket to {dst}"))?;
    set_sockopt_int(&socket, libc::SO_SNDBUF, 4 << 20);
    let mut payload = [0u8; UDP_PAYLOAD as usize];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: all-zero is a valid mmsghdr; all point at the one iovec, which outlives them.
    let mut msgs: Vec<libc::mmsghdr> = (0..UDP_BATCH)
        .map(|_| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration && !STOP.load(Ordering::Relaxed) {
        // SAFETY: msgs and the payload they point to are valid for the call.
        let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), UDP_BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
        }
        // Errors (ENOBUFS when a queue is full, ECONNREFUSED from an ICMP error) are the
        // path's business: keep sending.
    }
    Ok((sent, start.elapsed().as_secs_f64()))
}

fn set_sockopt_int(socket: &UdpSocket, opt: libc::c_int, value: libc::c_int) {
    // SAFETY: a plain int option on a valid socket. Best effort: a smaller buffer only costs
    // drops, which the figures show.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Machine-wide CPU time from the first line of /proc/stat.
struct CpuTimes {
    busy_jiffies: u64,
    at: Instant,
}

struct CpuUse {
    busy_s: f64,
    window_s: f64,
}

impl CpuTimes {
    fn read() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat.lines().next().unwrap_or_default();
        Ok(CpuTimes {
            busy_jiffies: busy_jiffies(line).with_context(|| format!("unreadable /proc/stat line {line:?}"))?,
            at: Instant::now(),
        })
    }

    fn since(&self, before: &CpuTimes) -> CpuUse {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        CpuUse {
            busy_s: self.busy_jiffies.saturating_sub(before.busy_jiffies) as f64 / hz,
            window_s: self.at.duration_since(before.at).as_secs_f64(),
        }
    }
}

/// user + nice + system + irq + softirq of a `cpu` line: time the CPUs worked. Idle, iowait
/// and steal (time a hypervisor gave to someone else) are not ours.
fn busy_jiffies(line: &str) -> Option<u64> {
    let mut f = line.split_whitespace();
    if !f.next()?.starts_with("cpu") {
        return None;
    }
    let v: Vec<u64> = f.map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    if v.len() < 4 {
        return None;
    }
    Some(at(0) + at(1) + at(2) + at(5) + at(6))
}

fn f64_at(v: &Value, pointer: &str) -> anyhow::Result<f64> {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .with_context(|| format!("iperf3 JSON has no number at {pointer}"))
}

/// A child process that is killed when dropped, on every path; and dies with us (PDEATHSIG)
/// if we are killed.
struct KillOnDrop(Child);

impl KillOnDrop {
    fn spawn(mut cmd: Command) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        Ok(KillOnDrop(child))
    }

    /// Wait up to `timeout` for the process to exit; kill it if it does not. Returns its exit
    /// status and everything it printed.
    fn wait(mut self, timeout: Duration) -> anyhow::Result<(ExitStatus, String, String)> {
        // Read both pipes while waiting: iperf3's JSON can outgrow a pipe buffer.
        let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_string(&mut s);
                }
                s
            })
        };
        let out = read(self.0.stdout.take().map(|p| Box::new(p) as _));
        let err = read(self.0.stderr.take().map(|p| Box::new(p) as _));
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.0.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                bail!("no exit after {timeout:?}; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok((status, out.join().unwrap_or_default(), err.join().unwrap_or_default()))
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// One iperf3 test from c1 to a one-shot server in c2; returns the client's and the server's
/// JSON reports.
fn iperf3(c1: Endpoint, c2: Endpoint, duration: u64, extra: &[&str]) -> anyhow::Result<(Value, Value)> {
    let port = IPERF_PORT.to_string();
    let mut server = c2.ns.command("iperf3");
    server.args(["-s", "-1", "-J", "-p", &port]);
    let mut server = KillOnDrop::spawn(server).context("starting the iperf3 server (apt-get install iperf3)")?;
    wait_listening(c2.ns, IPERF_PORT, &mut server)?;

    let mut client = c1.ns.command("iperf3");
    let (dst, secs) = (c2.ip.to_string(), duration.to_string());
    client
        .args(["-c", &dst, "-p", &port, "-t", &secs, "-J", "--connect-timeout", "3000"])
        .args(extra);
    let what = format!("iperf3 -c {dst} {}", extra.join(" "));
    let client = KillOnDrop::spawn(client).with_context(|| format!("starting {what}"))?;
    let limit = Duration::from_secs(duration + 20);
    let (status, out, err) = client.wait(limit).with_context(|| what.clone())?;
    let client_json = iperf3_json(&out, &err, status).with_context(|| what.clone())?;
    // The one-shot server prints its report and exits once the client is done.
    let (status, out, err) = server.wait(Duration::from_secs(10)).context("iperf3 server")?;
    let server_json = iperf3_json(&out, &err, status).context("iperf3 server")?;
    Ok((client_json, server_json))
}

fn iperf3_json(out: &str, err: &str, status: ExitStatus) -> anyhow::Result<Value> {
    let v: Value =
        serde_json::from_str(out).with_context(|| format!("exited {status} without a JSON report: {}", err.trim()))?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3 error: {e}");
    }
    if !status.success() {
        bail!("exited {status}: {}", err.trim());
    }
    Ok(v)
}

fn wait_listening(ns: &Netns, port: u16, server: &mut KillOnDrop) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let filter = format!(":{port}");
    loop {
        let out = ns.exec("ss", &["-Hltn", "sport", "=", &filter])?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("iperf3 server in {} not listening on port {port} after 5 s", ns.name());
        }
        if let Some(status) = server.0.try_wait()? {
            bail!("iperf3 server exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (packets, bytes, dropped) of an interface's `side` ("rx" or "tx"), from its kernel counters.
fn link_stats(ns: &Netns, iface: &str, side: &str) -> anyhow::Result<(u64, u64, u64)> {
    let out = ns.ip(&["-j", "-s", "link", "show", "dev", iface])?;
    let v: Value =
        serde_json::from_str(&out).with_context(|| format!("unreadable `ip -j -s link` output for {iface}"))?;
    let s = &v[0]["stats64"][side];
    let get = |k: &str| s[k].as_u64().unwrap_or(0);
    Ok((get("packets"), get("bytes"), get("dropped")))
}

/// kernel.bpf_stats_enabled on for the run, back to its old value after.
struct BpfStatsEnabled {
    old: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStatsEnabled {
    fn enable() -> anyhow::Result<Self> {
        let old = std::fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(BpfStatsEnabled {
            old: old.trim().to_string(),
        })
    }
}

impl Drop for BpfStatsEnabled {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.old);
    }
}

/// run_cnt and run_time_ns of every loaded program named like ours, by program id. Programs
/// are not per namespace: another run loading ours at the same time would be counted too.
fn bpf_prog_stats() -> anyhow::Result<Vec<(u64, String, u64, u64)>> {
    let out = overlay_tests::netns::run(Command::new("bpftool").args(["-j", "prog", "show"]))?;
    let v: Value = serde_json::from_str(&out).context("unreadable `bpftool -j prog show` output")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            if !name.starts_with("overlay_") {
                return None;
            }
            Some((
                p["id"].as_u64()?,
                name.to_string(),
                p["run_cnt"].as_u64().unwrap_or(0),
                p["run_time_ns"].as_u64().unwrap_or(0),
            ))
        })
        .collect())
}

fn bpf_stats_delta(before: &[(u64, String, u64, u64)], after: &[(u64, String, u64, u64)]) -> Value {
    let mut out = serde_json::Map::new();
    for (id, name, cnt, ns) in after {
        let Some((_, _, cnt0, ns0)) = before.iter().find(|b| b.0 == *id) else {
            continue;
        };
        let e = out
            .entry(name.clone())
            .or_insert_with(|| json!({"run_cnt": 0u64, "run_time_ns": 0u64}));
        e["run_cnt"] = json!(e["run_cnt"].as_u64().unwrap_or(0) + (cnt - cnt0));
        e["run_time_ns"] = json!(e["run_time_ns"].as_u64().unwrap_or(0) + (ns - ns0));
    }
    for e in out.values_mut() {
        let (cnt, ns) = (
            e["run_cnt"].as_u64().unwrap_or(0),
            e["run_time_ns"].as_u64().unwrap_or(0),
        );
        e["ns_per_run"] = json!(if cnt > 0 { ns as f64 / cnt as f64 } else { 0.0 });
    }
    Value::Object(out)
}

fn summary_line(run: &Value) -> String {
    let mut parts: Vec<String> = Metric::ALL
        .iter()
        .map(|m| match run[m.key()].as_f64() {
            Some(x) => format!("{} {:.1}", m.header(), x * m.scale()),
            None => format!("{} -", m.header()),
        })
        .collect();
    if let Some(modes) = run["xdp_mode"].as_array() {
        parts.push(format!(
            "decap {}",
            modes.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("/")
        ));
    }
    if let (Some(tx), Some(rx)) = (
        run["tcp1_underlay_tx"]["avg_bytes_per_skb"].as_u64(),
        run["tcp1_underlay_rx"]["avg_bytes_per_skb"].as_u64(),
    ) {
        parts.push(format!("tcp1 underlay skb tx/rx {tx}/{rx} B"));
    }
    if let Some(ns) = run["tcp1_bpf_stats"]["overlay_decap"]["ns_per_run"].as_f64() {
        parts.push(format!("decap {ns:.0} ns/run"));
    }
    if let Some(note) = run["note"].as_str() {
        parts.push(format!("NOTE {note}"));
    }
    for e in run["errors"].as_array().into_iter().flatten() {
        parts.push(format!("ERROR {}", e.as_str().unwrap_or_default()));
    }
    parts.join(", ")
}

#[derive(Clone, Copy, Debug)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(values: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = values.to_vec();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

fn report_json(opts: &Options, runs: &[Vec<Value>]) -> Value {
    let stats =
        |runs: &[Value], m: Metric| spread(&runs.iter().filter_map(|r| r[m.key()].as_f64()).collect::<Vec<_>>());
    let reference = |which: BenchBackend| {
        opts.backends
            .iter()
            .position(|b| *b == which)
            .map(|i| runs[i].as_slice())
    };
    let (host_gw, userspace) = (reference(BenchBackend::HostGw), reference(BenchBackend::UserspaceUdp));
    let backends: Vec<Value> = opts
        .backends
        .iter()
        .zip(runs)
        .map(|(b, runs)| {
            let mut summary = serde_json::Map::new();
            for m in Metric::ALL {
                let Some(s) = stats(runs, m) else { continue };
                let ratio = |r: Option<&[Value]>| r.and_then(|h| stats(h, m)).map(|h| s.median / h.median);
                summary.insert(
                    m.key().into(),
                    json!({
                        "median": s.median,
                        "min": s.min,
                        "max": s.max,
                        "ratio_to_host_gw": ratio(host_gw),
                        "ratio_to_userspace_udp": ratio(userspace),
                    }),
                );
            }
            let xdp = runs
                .iter()
                .find_map(|r| r.get("xdp_mode").cloned())
                .unwrap_or(Value::Null);
            let goals = if b.ebpf().is_some() {
                goals_json(&summary)
            } else {
                Value::Null
            };
            json!({
                "backend": b.name(),
                "container_mtu": b.container_mtu(),
                "xdp_mode": xdp,
                "summary": summary,
                "goals": goals,
                "runs": runs,
            })
        })
        .collect();
    json!({
        "benchmark": "datapath",
        "config": {
            "underlay": opts.underlay.name(),
            "rounds": opts.rounds,
            "duration_s": opts.duration,
            "underlay_mtu": UNDERLAY_MTU,
            "streams": STREAMS,
            "udp_payload": UDP_PAYLOAD,
            "pings": PINGS,
            "udp_round_trips": RR_ROUND_TRIPS,
            "ping_interval_s": PING_INTERVAL,
            "kernel": read_trimmed("/proc/sys/kernel/osrelease"),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_at_end": read_trimmed("/proc/loadavg"),
            "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "topology": "two hosts on an underlay of MTU 1500 (veth: one veth pair; bridge: a bridge between them), one container per host behind docker0; c1 (host1) client, c2 (host2) server; underlay: host1 to host2 with no overlay",
            "ebpf_setup": format!(
                "ebpf-*: `overlay agent` on each host (--datapath=ebpf --iptables-forward-rules=false, plus the backend's --decap/--xdp-mode) against etcd ({ETCD_BIN}) in host1's namespace on its underlay address, network config {}; each agent reuses the static subnet pre-seeded in its subnet file; measured once each agent has the other host as a peer and, with TC decap, the bridge program redirects on both hosts",
                network_config(Backend::Vxlan)
            ),
            "baselines_setup": "host-gw, kernel-vxlan, userspace-udp: programmed as flannel programs them, peer entries written directly",
            "udp64_sender": format!("{UDP_SENDERS} threads, one flow each, sendmmsg batches of {UDP_BATCH}"),
            "cpu": "machine-wide busy time (user+nice+system+irq+softirq from /proc/stat) during the 1-stream TCP test, per Gbit received",
            "machine": machine_description(),
        },
        "backends": backends,
    })
}

fn print_tables(opts: &Options, report: &Value) {
    let rows: Vec<&Value> = report["backends"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let name_w = rows
        .iter()
        .filter_map(|r| r["backend"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(7)
        .max(7);
    let cell = |r: &Value, m: Metric| -> (String, String) {
        let s = &r["summary"][m.key()];
        let Some(median) = s["median"].as_f64() else {
            return ("-".into(), "-".into());
        };
        let v = median * m.scale();
        let value = if v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        };
        let ratio = s["ratio_to_host_gw"]
            .as_f64()
            .map(|x| format!("{x:.2}x"))
            .unwrap_or("-".into());
        let range = format!(
            "{:.1}-{:.1}",
            s["min"].as_f64().unwrap_or(0.0) * m.scale(),
            s["max"].as_f64().unwrap_or(0.0) * m.scale()
        );
        (format!("{value:>8} {ratio:>6}"), range)
    };
    let xdp = |r: &Value| -> String {
        match r["xdp_mode"].as_array() {
            Some(modes) => {
                let mut m: Vec<&str> = modes
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|s| match s {
                        "Driver" => "xdp",
                        "Skb" => "xdp-gen",
                        other => other,
                    })
                    .collect();
                m.dedup();
                m.join("/")
            }
            None => "-".into(),
        }
    };

    println!();
    println!(
        "Medians over {} round(s) of {} s, ratio to host-gw (throughput: higher is better; RTT: lower is better)",
        opts.rounds, opts.duration
    );
    let mut header = format!("{:<name_w$}  {:<8}", "backend", "decap");
    for m in Metric::ALL {
        header += &format!("  {:>15}", m.header());
    }
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    for r in &rows {
        let mut line = format!("{:<name_w$}  {:<8}", r["backend"].as_str().unwrap_or("?"), xdp(r));
        for m in Metric::ALL {
            line += &format!("  {:>15}", cell(r, m).0);
        }
        println!("{line}");
    }
    for r in &rows {
        let notes: std::collections::BTreeSet<&str> = r["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|run| run["note"].as_str())
            .collect();
        for note in notes {
            println!("note: {}: {note}", r["backend"].as_str().unwrap_or("?"));
        }
    }
    if opts.rounds > 1 {
        println!();
        println!("Spread (min-max over rounds)");
        let mut header = format!("{:<name_w$}", "backend");
        for m in Metric::ALL {
            header += &format!("  {:>15}", m.header());
        }
        println!("{header}");
        for r in &rows {
            let mut line = format!("{:<name_w$}", r["backend"].as_str().unwrap_or("?"));
            for m in Metric::ALL {
                line += &format!("  {:>15}", cell(r, m).1);
            }
            println!("{line}");
        }
    }
    if rows.iter().any(|r| r["backend"] == BenchBackend::UserspaceUdp.name()) {
        println!();
        println!("Ratio to userspace-udp (flannel's udp design, the baseline to beat)");
        let mut header = format!("{:<name_w$}", "backend");
        for m in Metric::ALL {
            header += &format!("  {:>15}", m.header());
        }
        println!("{header}");
        for r in &rows {
            let mut line = format!("{:<name_w$}", r["backend"].as_str().unwrap_or("?"));
            for m in Metric::ALL {
                let x = r["summary"][m.key()]["ratio_to_userspace_udp"].as_f64();
                line += &format!("  {:>15}", x.map(|x| format!("{x:.2}x")).unwrap_or("-".into()));
            }
            println!("{line}");
        }
    }
    let with_goals: Vec<&&Value> = rows.iter().filter(|r| r["goals"].is_array()).collect();
    if !with_goals.is_empty() {
        println!();
        println!("Goals for our datapath (ratios to host-gw)");
        for r in with_goals {
            let parts: Vec<String> = r["goals"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|g| {
                    format!(
                        "{} {} {:.2}x: {}",
                        g["metric"].as_str().unwrap_or("?"),
                        g["goal"].as_str().unwrap_or("?"),
                        g["ratio"].as_f64().unwrap_or(f64::NAN),
                        match g["met"].as_bool() {
                            Some(true) => "met",
                            Some(false) => "MISSED",
                            None => "not measured",
                        }
                    )
                })
                .collect();
            println!(
                "{:<name_w$}  {}",
                r["backend"].as_str().unwrap_or("?"),
                parts.join("; ")
            );
        }
    }
    println!();
}

/// The issue's goals for our datapath: at least host-gw's throughput and small-packet rate,
/// at most 1.1x its RTT p50 (judged on ping and on the finer UDP round trip alike).
const GOALS: [(Metric, &str, f64); 5] = [
    (Metric::Tcp1, ">=", 1.0),
    (Metric::Tcp4, ">=", 1.0),
    (Metric::Udp64, ">=", 1.0),
    (Metric::RttP50, "<=", 1.1),
    (Metric::RrP50, "<=", 1.1),
];

fn goals_json(summary: &serde_json::Map<String, Value>) -> Value {
    GOALS
        .iter()
        .map(|&(m, op, target)| {
            let ratio = summary.get(m.key()).and_then(|s| s["ratio_to_host_gw"].as_f64());
            let met = ratio.map(|r| if op == ">=" { r >= target } else { r <= target });
            json!({"metric": m.key(), "goal": format!("{op} {target}x"), "ratio": ratio, "met": met})
        })
        .collect()
}

/// CPU model, cores, memory and kernel, for the record.
fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1).map(str::trim))
        .unwrap_or("unknown CPU");
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    format!(
        "{model}, {} CPUs, {:.0} GiB, Linux {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        mem_kb as f64 / (1 << 20) as f64,
        read_trimmed("/proc/sys/kernel/osrelease")
    )
}

/// One color per backend, stable across runs.
fn backend_color(name: &str) -> &'static str {
    match name {
        "underlay" => "#7f7f7f",
        "host-gw" => "#1f77b4",
        "kernel-vxlan" => "#ff7f0e",
        "ebpf-vxlan" => "#2ca02c",
        "ebpf-udp" => "#17becf",
        "userspace-udp" => "#d62728",
        "ebpf-vxlan-xdp" => "#bcbd22",
        "ebpf-vxlan-generic" => "#9467bd",
        _ => "#8c564b",
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Grouped bars, one group per figure, one bar per backend: the median's ratio to host-gw on a
/// log scale (0.01x to 10x), so that 0.03x and 3x are both readable; host-gw is the 1x line.
fn chart_svg(report: &Value) -> String {
    // Backends without a figure (a known limitation, a failed setup) get no bar and no legend.
    let rows: Vec<&Value> = report["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["summary"].as_object().is_some_and(|m| !m.is_empty()))
        .collect();
    let (w, h) = (1000.0_f64, 520.0_f64);
    let (left, right, top, bottom) = (70.0, 20.0, 70.0, 120.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let (lo, hi) = (0.01_f64.log10(), 10.0_f64.log10());
    let y = |ratio: f64| top + plot_h * (hi - ratio.clamp(0.01, 10.0).log10()) / (hi - lo);
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" font-size="16" text-anchor="middle" font-weight="bold">overlay-bench: container to container, ratio to host-gw (median of {} round(s) of {} s)</text>
<text x="{}" y="44" text-anchor="middle" fill="#444">{}</text>
"##,
        w / 2.0,
        report["config"]["rounds"],
        report["config"]["duration_s"],
        w / 2.0,
        xml_escape(report["config"]["machine"].as_str().unwrap_or_default()),
    );
    for tick in [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0] {
        let ty = y(tick);
        let (stroke, dash) = if tick == 1.0 {
            ("#000", "")
        } else {
            ("#ddd", r#" stroke-dasharray="3,3""#)
        };
        svg += &format!(
            r#"<line x1="{left}" x2="{}" y1="{ty:.1}" y2="{ty:.1}" stroke="{stroke}"{dash}/><text x="{}" y="{:.1}" text-anchor="end">{tick}x</text>
"#,
            w - right,
            left - 6.0,
            ty + 4.0
        );
    }
    svg += &format!(
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">ratio to host-gw (log scale; host-gw = 1x)</text>
"#,
        top + plot_h / 2.0
    );
    let group_w = plot_w / Metric::ALL.len() as f64;
    let bar_w = (group_w - 20.0) / rows.len().max(1) as f64;
    for (g, m) in Metric::ALL.iter().enumerate() {
        let gx = left + g as f64 * group_w + 10.0;
        for (i, r) in rows.iter().enumerate() {
            let name = r["backend"].as_str().unwrap_or("?");
            let Some(ratio) = r["summary"][m.key()]["ratio_to_host_gw"].as_f64() else {
                continue;
            };
            let x = gx + i as f64 * bar_w;
            let (y0, y1) = (y(ratio), y(0.01));
            svg += &format!(
                r#"<rect x="{x:.1}" y="{y0:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{name}: {ratio:.2}x</title></rect>
"#,
                (bar_w - 2.0).max(1.0),
                (y1 - y0).max(0.0),
                backend_color(name)
            );
            svg += &format!(
                r#"<text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{}</text>
"#,
                x + bar_w / 2.0 - 1.0,
                y0 - 3.0,
                if (0.995..10.0).contains(&ratio) {
                    format!("{ratio:.1}")
                } else {
                    format!("{ratio:.2}")
                }
            );
        }
        svg += &format!(
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#444">{}</text>
"##,
            gx + (group_w - 20.0) / 2.0,
            top + plot_h + 18.0,
            m.label(),
            gx + (group_w - 20.0) / 2.0,
            top + plot_h + 33.0,
            if m.higher_is_better() {
                "higher is better"
            } else {
                "lower is better"
            }
        );
    }
    let legend_y = h - 40.0;
    let item_w = plot_w / rows.len().max(1) as f64;
    for (i, r) in rows.iter().enumerate() {
        let name = r["backend"].as_str().unwrap_or("?");
        let x = left + i as f64 * item_w;
        svg += &format!(
            r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{legend_y:.1}">{name}</text>
"#,
            legend_y - 10.0,
            backend_color(name),
            x + 16.0
        );
    }
    svg += "</svg>\n";
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_median_and_range() {
        let s = spread(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = spread(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert!(spread(&[]).is_none());
    }

    #[test]
    fn backend_names_round_trip() {
        for b in BenchBackend::ALL {
            assert_eq!(BenchBackend::parse(b.name()).unwrap(), b);
        }
        assert!(BenchBackend::parse("vxlan").is_err());
        assert_eq!(BenchBackend::EbpfUdp.container_mtu(), 1472);
        assert_eq!(BenchBackend::EbpfVxlanGeneric.container_mtu(), 1450);
        assert_eq!(BenchBackend::UserspaceUdp.container_mtu(), 1472);
    }

    #[test]
    fn decap_mode_from_the_agents_backend_line() {
        assert_eq!(decap_mode("ebpf-vxlan (decap tc, device ovl0)").as_deref(), Some("tc"));
        assert_eq!(decap_mode("ebpf-udp (decap tc, device ovl0)").as_deref(), Some("tc"));
        assert_eq!(
            decap_mode("ebpf-vxlan (decap xdp driver, device ovl0)").as_deref(),
            Some("Driver")
        );
        assert_eq!(
            decap_mode("ebpf-vxlan (decap xdp skb, device ovl0)").as_deref(),
            Some("Skb")
        );
        assert_eq!(
            decap_mode("ebpf-vxlan (decap xdp adopted, device ovl0)").as_deref(),
            Some("xdp adopted")
        );
        assert_eq!(decap_mode("kernel vxlan"), None);
    }

    #[test]
    fn seeded_subnet_file_is_reused_by_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        for i in [1, 2] {
            std::fs::write(&path, seeded_subnet_file(lab::static_subnet(i), 1450)).unwrap();
            let (v4, v6) = overlay::subnet::file::read_previous_subnets(&path);
            assert_eq!(v4, Some(lab::static_subnet(i)));
            assert_eq!(v6, None);
        }
        let env = seeded_subnet_file(lab::static_subnet(2), 1472);
        assert!(env.contains("FLANNEL_SUBNET=10.244.2.1/24\n"), "{env}");
        assert!(env.contains("FLANNEL_MTU=1472\n"), "{env}");
    }

    #[test]
    fn network_config_as_flannel_users_write_it() {
        assert_eq!(
            network_config(Backend::Vxlan),
            r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#
        );
        let v: Value = serde_json::from_str(&network_config(Backend::Udp)).unwrap();
        assert_eq!(v["Backend"]["Type"], "udp");
        let args = agent_args(
            "http://192.168.250.1:2379",
            "eth0",
            Path::new("/t/host1/subnet.env"),
            Path::new("/t/host1/bpf"),
            &["--decap", "xdp"],
        );
        assert_eq!(args[0], "agent");
        for flag in [
            "--etcd-endpoints=http://192.168.250.1:2379", "--iface=eth0", "--subnet-file=/t/host1/subnet.env",
            "--pin-dir=/t/host1/bpf", "--datapath=ebpf",
        ] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing from {args:?}");
        }
        assert_eq!(args[args.len() - 2..], ["--decap", "xdp"]);
    }

    #[test]
    fn busy_jiffies_leave_out_idle_iowait_and_steal() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        assert_eq!(busy_jiffies("cpu  10 1 5 1000 7 2 3 50 0 0"), Some(21));
        assert_eq!(busy_jiffies("intr 1 2 3"), None);
        assert_eq!(busy_jiffies("cpu 1 x 3 4"), None);
    }

    #[test]
    fn chart_has_a_bar_per_backend_and_figure() {
        let summary = |r: f64| json!({"ratio_to_host_gw": r});
        let backend = |name: &str, r: f64| {
            let mut s = serde_json::Map::new();
            for m in Metric::ALL {
                s.insert(m.key().into(), summary(r));
            }
            json!({"backend": name, "summary": s})
        };
        let report = json!({
            "config": {"rounds": 3, "duration_s": 5, "machine": "a <test> machine"},
            "backends": [backend("host-gw", 1.0), backend("userspace-udp", 0.03)],
        });
        let svg = chart_svg(&report);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<title>").count(), 2 * Metric::ALL.len());
        assert!(svg.contains("a &lt;test&gt; machine"));
    }
}
