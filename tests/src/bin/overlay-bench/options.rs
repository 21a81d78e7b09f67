//! What to run: the backends, the underlay and the command line.
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use overlay::backend::tun_udp::ENCAP_OVERHEAD;
use overlay_tests::lab::Backend;

use crate::topology::UNDERLAY_MTU;

pub const USAGE: &str = "\
overlay-bench: TCP throughput, UDP packet rate, ping and UDP RTT and CPU per Gbit, container to
container, for the underlay alone, host-gw, the kernel vxlan device as flannel configures it,
our eBPF datapath (`overlay agent` on each host, with etcd in the lab), and flannel's udp design
(TUN + UDP socket in user space).

Usage: overlay-bench [--rounds N] [--duration SECS] [--quick] [--json PATH] [--svg PATH]
                     [--backends NAME,NAME,...] [--underlay veth|bridge] [--bpf-stats]
                     [--while-tcp COMMAND]
       overlay-bench --control-plane ...   (see overlay-bench-cp --help)

  --rounds N        rounds over all backends, each on a fresh lab (default 3)
  --duration SECS   length of each throughput and packet-rate measurement (default 5)
  --quick           smoke run: 1 round of 2 s measurements
  --json PATH       raw per-round figures (default target/bench/datapath.json)
  --svg PATH        chart of the ratios to host-gw (default target/bench/datapath.svg)
  --backends LIST   subset, in this order (default: all):
                    underlay,host-gw,kernel-vxlan,ebpf-vxlan,ebpf-udp,userspace-udp,
                    ebpf-vxlan-xdp,ebpf-vxlan-generic,ebpf-vxlan-kernel-routing,
                    ebpf-udp-kernel-routing,ebpf-host-gw
                    (ebpf-*: TC ingress decap on veth, the default; -xdp: native XDP
                    decap; -generic: generic XDP decap; all with host routing (container
                    traffic past the host's stack) but -kernel-routing; ebpf-host-gw:
                    the agent's host-gw with host routing, no encapsulation)
  --underlay KIND   veth: the hosts' eth0 are the two ends of one veth (default);
                    bridge: each host's eth0 is a port of a bridge, a switch between them
  --bpf-stats       enable kernel.bpf_stats_enabled during the run and record the run time
                    of our programs in the 1-stream TCP test (costs some ns per packet)
  --while-tcp CMD   run `sh -c CMD` (in the bench's namespace) once the 1-stream TCP test's
                    traffic flows, for profiling it: e.g. 'perf record -a -g -o
                    /tmp/{backend}-{round}.data -- sleep 2'; {backend} and {round} are
                    replaced; it must end within the test's duration; its output is kept in
                    the JSON (tcp1_while)

Needs root, iperf3 and ping, the `overlay` binary next to this one (cargo build --release) and,
for the eBPF backends, Debian's etcd (apt-get install etcd-server).
The 64-byte test uses its own senders (sendmmsg, one thread per CPU) and receiver (recvmmsg),
since iperf3 before 3.16 sends from one thread and is slower than the paths it measures.";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchBackend {
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
    /// Our datapaths with every packet through the host's stack (`--host-routing=kernel`),
    /// as before host routing: what the shortcut gains.
    EbpfVxlanKernelRouting,
    EbpfUdpKernelRouting,
    /// Our eBPF host-gw: the kernel's host-gw routes plus host routing, no encapsulation.
    EbpfHostGw,
}

impl BenchBackend {
    pub const ALL: [BenchBackend; 11] = [
        BenchBackend::Underlay,
        BenchBackend::HostGw,
        BenchBackend::KernelVxlan,
        BenchBackend::EbpfVxlan,
        BenchBackend::EbpfUdp,
        BenchBackend::UserspaceUdp,
        BenchBackend::EbpfVxlanXdp,
        BenchBackend::EbpfVxlanGeneric,
        BenchBackend::EbpfVxlanKernelRouting,
        BenchBackend::EbpfUdpKernelRouting,
        BenchBackend::EbpfHostGw,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BenchBackend::Underlay => "underlay",
            BenchBackend::HostGw => "host-gw",
            BenchBackend::KernelVxlan => "kernel-vxlan",
            BenchBackend::EbpfVxlan => "ebpf-vxlan",
            BenchBackend::EbpfUdp => "ebpf-udp",
            BenchBackend::UserspaceUdp => "userspace-udp",
            BenchBackend::EbpfVxlanXdp => "ebpf-vxlan-xdp",
            BenchBackend::EbpfVxlanGeneric => "ebpf-vxlan-generic",
            BenchBackend::EbpfVxlanKernelRouting => "ebpf-vxlan-kernel-routing",
            BenchBackend::EbpfUdpKernelRouting => "ebpf-udp-kernel-routing",
            BenchBackend::EbpfHostGw => "ebpf-host-gw",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Self::ALL.into_iter().find(|b| b.name() == s).with_context(|| {
            let names: Vec<_> = Self::ALL.iter().map(|b| b.name()).collect();
            format!("unknown backend {s:?}: expected one of {}", names.join(", "))
        })
    }

    /// Our datapath's format and the extra flags it runs with, for the eBPF variants.
    pub fn ebpf(self) -> Option<(Backend, &'static [&'static str])> {
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
            BenchBackend::EbpfVxlanKernelRouting => Some((Backend::Vxlan, &["--host-routing=kernel"])),
            BenchBackend::EbpfUdpKernelRouting => Some((Backend::Udp, &["--host-routing=kernel"])),
            BenchBackend::EbpfHostGw => Some((Backend::HostGw, &[])),
        }
    }

    /// `--host-routing` of our datapaths: "bpf" (the default) or "kernel"; None for the others.
    pub fn host_routing(self) -> Option<&'static str> {
        let (_, extra) = self.ebpf()?;
        Some(if extra.contains(&"--host-routing=kernel") {
            "kernel"
        } else {
            "bpf"
        })
    }

    /// Container MTU = overlay MTU, as flannel hands it to docker.
    pub fn container_mtu(self) -> u32 {
        match self {
            BenchBackend::Underlay | BenchBackend::HostGw => UNDERLAY_MTU,
            BenchBackend::KernelVxlan => UNDERLAY_MTU - 50,
            BenchBackend::UserspaceUdp => UNDERLAY_MTU - ENCAP_OVERHEAD,
            b => UNDERLAY_MTU - b.ebpf().expect("eBPF backend").0.overhead(),
        }
    }
}

/// How the two hosts are joined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Underlay {
    /// One veth pair, host1's eth0 to host2's eth0: the fewest hops.
    Veth,
    /// Each host on a port of a bridge. Needed for generic XDP on the receiver: a frame that a
    /// TC program on host1 redirected keeps skb->redirected across a bare veth, and generic
    /// XDP passes such skbs by unseen; a bridge port's receive clears the flag, as a wire does.
    Bridge,
}

impl Underlay {
    pub fn name(self) -> &'static str {
        match self {
            Underlay::Veth => "veth",
            Underlay::Bridge => "bridge",
        }
    }
}

pub struct Options {
    pub underlay: Underlay,
    pub rounds: usize,
    pub duration: u64,
    pub json: PathBuf,
    pub svg: PathBuf,
    pub backends: Vec<BenchBackend>,
    pub bpf_stats: bool,
    /// A shell command to run while the 1-stream TCP test's traffic flows (profiling).
    pub while_tcp: Option<String>,
}

pub fn parse_args() -> anyhow::Result<Option<Options>> {
    let mut o = Options {
        underlay: Underlay::Veth,
        rounds: 3,
        duration: 5,
        json: PathBuf::from("target/bench/datapath.json"),
        svg: PathBuf::from("target/bench/datapath.svg"),
        backends: BenchBackend::ALL.to_vec(),
        bpf_stats: false,
        while_tcp: None,
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
            "--while-tcp" => o.while_tcp = Some(value("--while-tcp")?),
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    if o.rounds == 0 || o.duration == 0 || o.backends.is_empty() {
        bail!("--rounds, --duration and --backends must not be zero or empty");
    }
    Ok(Some(o))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
