//! What to run: the backends, the underlay and the command line.
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use overlay::backend::tun_udp::ENCAP_OVERHEAD;
use overlay_common::wire::VXLAN6_OVERHEAD;
use overlay_tests::lab::Backend;

use crate::topology::UNDERLAY_MTU;

pub const USAGE: &str = "\
overlay-bench: TCP throughput, UDP packet rate, ping and UDP RTT and CPU per Gbit, container to
container, for the underlay alone, host-gw, the kernel vxlan device as flannel configures it,
our eBPF datapath (`overlay agent` on each host, with etcd in the lab), and flannel's udp design
(TUN + UDP socket in user space).

Usage: overlay-bench [--rounds N] [--duration SECS] [--quick] [--json PATH] [--svg PATH]
                     [--backends NAME,NAME,...] [--ip-family 4|6|both] [--underlay veth|bridge]
                     [--bpf-stats] [--while-tcp COMMAND]
       overlay-bench --control-plane ...   (see overlay-bench-cp --help)

  --rounds N        rounds over all backends, each on a fresh lab (default 3)
  --duration SECS   length of each throughput and packet-rate measurement (default 5)
  --quick           smoke run: 1 round of 2 s measurements
  --json PATH       raw per-round figures (default target/bench/datapath.json)
  --svg PATH        chart of the ratios to host-gw (default target/bench/datapath.svg)
  --backends LIST   subset, in this order (default: all):
                    underlay,host-gw,kernel-vxlan,ebpf-vxlan,ebpf-udp,userspace-udp,
                    ebpf-vxlan-xdp,ebpf-vxlan-generic,ebpf-vxlan-kernel-routing,
                    ebpf-udp-kernel-routing,ebpf-host-gw,
                    host-gw-v6,kernel-vxlan-v6,ebpf-vxlan-v6
                    (ebpf-*: TC ingress decap on veth, the default; -xdp: native XDP
                    decap; -generic: generic XDP decap; all with host routing (container
                    traffic past the host's stack) but -kernel-routing; ebpf-host-gw:
                    the agent's host-gw with host routing, no encapsulation;
                    *-v6: container to container over IPv6 on a dual-stack underlay, VXLAN
                    over IPv6 (flannel's flannel-v6.1) between dual-stack agents, container
                    MTU 1430; kernel-vxlan-v6 is `overlay agent --datapath=kernel`;
                    host routing is IPv4 only, so none for IPv6; ratios to host-gw-v6)
  --ip-family F     4, 6 or both (default): the backends of that family, of the default
                    list or of --backends (which then must not name another family)
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
    /// flannel's host-gw for IPv6: a route to each peer's IPv6 subnet via its PublicIPv6.
    HostGwV6,
    /// flannel's `flannel-v6.1`, as our agent programs it with `--datapath=kernel`.
    KernelVxlanV6,
    /// Our eBPF datapath carrying IPv6 as VXLAN over the IPv6 underlay (dual-stack agents).
    EbpfVxlanV6,
}

/// The family of the containers' addresses a backend is measured over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn parse(s: &str) -> anyhow::Result<Option<Self>> {
        Ok(match s {
            "4" => Some(IpFamily::V4),
            "6" => Some(IpFamily::V6),
            "both" => None,
            other => bail!("--ip-family {other:?}: expected 4, 6 or both"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

/// How a backend runs `overlay agent` (against etcd in the lab): our wire format, the
/// `--datapath` it must get and its extra flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentRun {
    pub format: Backend,
    pub datapath: &'static str,
    pub extra: &'static [&'static str],
}

impl BenchBackend {
    pub const ALL: [BenchBackend; 14] = [
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
        BenchBackend::HostGwV6,
        BenchBackend::KernelVxlanV6,
        BenchBackend::EbpfVxlanV6,
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
            BenchBackend::HostGwV6 => "host-gw-v6",
            BenchBackend::KernelVxlanV6 => "kernel-vxlan-v6",
            BenchBackend::EbpfVxlanV6 => "ebpf-vxlan-v6",
        }
    }

    pub fn family(self) -> IpFamily {
        match self {
            BenchBackend::HostGwV6 | BenchBackend::KernelVxlanV6 | BenchBackend::EbpfVxlanV6 => IpFamily::V6,
            _ => IpFamily::V4,
        }
    }

    /// The host-gw of the same family: what the ratios are to.
    pub fn host_gw_baseline(self) -> BenchBackend {
        match self.family() {
            IpFamily::V4 => BenchBackend::HostGw,
            IpFamily::V6 => BenchBackend::HostGwV6,
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
            BenchBackend::Underlay
            | BenchBackend::HostGw
            | BenchBackend::KernelVxlan
            | BenchBackend::UserspaceUdp
            | BenchBackend::HostGwV6
            | BenchBackend::KernelVxlanV6 => None,
            // No --decap or --xdp-mode: what users get by default (TC ingress decap on a veth
            // underlay, native XDP where the driver has it).
            BenchBackend::EbpfVxlan => Some((Backend::Vxlan, &[])),
            BenchBackend::EbpfUdp => Some((Backend::Udp, &[])),
            BenchBackend::EbpfVxlanXdp => Some((Backend::Vxlan, &["--decap", "xdp"])),
            BenchBackend::EbpfVxlanGeneric => Some((Backend::Vxlan, &["--decap", "xdp", "--xdp-mode", "generic"])),
            BenchBackend::EbpfVxlanKernelRouting => Some((Backend::Vxlan, &["--host-routing=kernel"])),
            BenchBackend::EbpfUdpKernelRouting => Some((Backend::Udp, &["--host-routing=kernel"])),
            BenchBackend::EbpfHostGw => Some((Backend::HostGw, &[])),
            // Host routing is IPv4 only: IPv6 takes the host's stack with or without it; the
            // flag makes the table say so (and the readiness wait look at the bridge program).
            BenchBackend::EbpfVxlanV6 => Some((Backend::Vxlan, &["--host-routing=kernel"])),
        }
    }

    /// For the backends that run `overlay agent`: our eBPF ones, and flannel's kernel vxlan
    /// over IPv6, which our agent programs as flanneld does (`--datapath=kernel`).
    pub fn agent(self) -> Option<AgentRun> {
        if self == BenchBackend::KernelVxlanV6 {
            return Some(AgentRun {
                format: Backend::Vxlan,
                datapath: "kernel",
                extra: &[],
            });
        }
        let (format, extra) = self.ebpf()?;
        Some(AgentRun {
            format,
            datapath: "ebpf",
            extra,
        })
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
            BenchBackend::Underlay | BenchBackend::HostGw | BenchBackend::HostGwV6 => UNDERLAY_MTU,
            BenchBackend::KernelVxlan => UNDERLAY_MTU - 50,
            // VXLAN over IPv6 takes 70 bytes (the kernel refuses a flannel-v6 device above
            // 1430 on a 1500 underlay); both families of the container share this MTU.
            BenchBackend::KernelVxlanV6 | BenchBackend::EbpfVxlanV6 => UNDERLAY_MTU - VXLAN6_OVERHEAD,
            BenchBackend::UserspaceUdp => UNDERLAY_MTU - ENCAP_OVERHEAD,
            b => UNDERLAY_MTU - b.ebpf().expect("eBPF backend").0.overhead(),
        }
    }

    /// The MTU the agent reports and writes as FLANNEL_MTU: in a dual-stack vxlan network,
    /// flannel's is the IPv4 device's (IPv6 packets learn the 1430 of the overlay route).
    pub fn agent_mtu(self) -> u32 {
        match self {
            BenchBackend::KernelVxlanV6 | BenchBackend::EbpfVxlanV6 => UNDERLAY_MTU - Backend::Vxlan.overhead(),
            b => b.container_mtu(),
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
    parse_from(std::env::args().skip(1))
}

/// The options `args` (without the program name) ask for; None for --help.
pub fn parse_from(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Options>> {
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
    let (mut named, mut family) = (false, None);
    let mut args = args.into_iter();
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
                    .collect::<anyhow::Result<_>>()?;
                named = true;
            }
            "--ip-family" => family = IpFamily::parse(&value("--ip-family")?)?,
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
    if let Some(family) = family {
        if let Some(other) = o.backends.iter().find(|b| named && b.family() != family) {
            bail!(
                "--backends names {}, an {} backend, with --ip-family {}",
                other.name(),
                other.family().name(),
                if family == IpFamily::V4 { 4 } else { 6 }
            );
        }
        o.backends.retain(|b| b.family() == family);
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

    fn parse(args: &str) -> anyhow::Result<Options> {
        Ok(parse_from(args.split_whitespace().map(String::from))?.expect("not --help"))
    }

    fn names(o: &Options) -> Vec<&'static str> {
        o.backends.iter().map(|b| b.name()).collect()
    }

    #[test]
    fn ipv6_backends_have_their_mtus_agents_and_baseline() {
        for b in [BenchBackend::KernelVxlanV6, BenchBackend::EbpfVxlanV6] {
            assert_eq!(b.family(), IpFamily::V6);
            assert_eq!(b.container_mtu(), 1430, "{b:?}");
            assert_eq!(b.agent_mtu(), 1450, "{b:?}");
            assert_eq!(b.host_gw_baseline(), BenchBackend::HostGwV6);
        }
        assert_eq!(BenchBackend::HostGwV6.container_mtu(), 1500);
        assert_eq!(BenchBackend::HostGwV6.agent(), None);
        assert_eq!(BenchBackend::EbpfVxlan.host_gw_baseline(), BenchBackend::HostGw);
        assert_eq!(BenchBackend::EbpfVxlan.agent_mtu(), 1450);
        let kernel = BenchBackend::KernelVxlanV6.agent().unwrap();
        assert_eq!((kernel.format, kernel.datapath), (Backend::Vxlan, "kernel"));
        assert_eq!(BenchBackend::KernelVxlanV6.ebpf(), None);
        let ours = BenchBackend::EbpfVxlanV6.agent().unwrap();
        assert_eq!((ours.format, ours.datapath), (Backend::Vxlan, "ebpf"));
        assert_eq!(BenchBackend::EbpfVxlanV6.host_routing(), Some("kernel"));
        assert_eq!(BenchBackend::EbpfUdp.agent().unwrap().datapath, "ebpf");
    }

    #[test]
    fn ip_family_picks_the_backends_of_one_family() {
        assert_eq!(parse("").unwrap().backends, BenchBackend::ALL.to_vec());
        assert_eq!(parse("--ip-family both").unwrap().backends, BenchBackend::ALL.to_vec());
        assert_eq!(
            names(&parse("--ip-family 6").unwrap()),
            ["host-gw-v6", "kernel-vxlan-v6", "ebpf-vxlan-v6"]
        );
        let v4 = parse("--quick --ip-family 4").unwrap();
        assert_eq!(v4.backends.len(), 11);
        assert!(v4.backends.iter().all(|b| b.family() == IpFamily::V4));
        assert_eq!((v4.rounds, v4.duration), (1, 2));
        // Order of the flags does not matter; --backends keeps its order.
        let o = parse("--ip-family 6 --backends ebpf-vxlan-v6,host-gw-v6").unwrap();
        assert_eq!(names(&o), ["ebpf-vxlan-v6", "host-gw-v6"]);
        let o = parse("--backends host-gw,host-gw-v6,ebpf-vxlan,ebpf-vxlan-v6 --ip-family both").unwrap();
        assert_eq!(names(&o), ["host-gw", "host-gw-v6", "ebpf-vxlan", "ebpf-vxlan-v6"]);
    }

    #[test]
    fn ip_family_errors_name_the_problem() {
        let err = |args: &str| format!("{:#}", parse(args).err().expect(args));
        assert_eq!(err("--ip-family 5"), r#"--ip-family "5": expected 4, 6 or both"#);
        assert!(err("--ip-family").starts_with("--ip-family needs a value"));
        assert_eq!(
            err("--backends host-gw,ebpf-vxlan-v6 --ip-family 4"),
            "--backends names ebpf-vxlan-v6, an IPv6 backend, with --ip-family 4"
        );
        assert_eq!(
            err("--ip-family 6 --backends kernel-vxlan"),
            "--backends names kernel-vxlan, an IPv4 backend, with --ip-family 6"
        );
        assert!(err("--backends ebpf-vxlan6").starts_with(r#"unknown backend "ebpf-vxlan6""#));
    }
}
