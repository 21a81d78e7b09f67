//! `overlay datapath`: the eBPF datapath with a static peer table, no etcd. Used by the tests,
//! the benchmarks and anyone who wants to try the datapath alone.
use std::{
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
    time::Duration,
};

use anyhow::Context as _;
use ipnetwork::{Ipv4Network, Ipv6Network};
use nix::sys::signal::{SigSet, Signal};

use crate::{
    backend::{
        Peer,
        ebpf::{
            Datapath, DatapathSpec, DecapAttach, DecapHook, Format, HostRouting, Programs, XdpAttach, backend_kind,
            ipv6::Peer6,
        },
    },
    host::MacAddr,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Udp,
    Vxlan,
}

impl From<Backend> for Format {
    fn from(b: Backend) -> Format {
        match b {
            Backend::Udp => Format::Udp,
            Backend::Vxlan => Format::Vxlan,
        }
    }
}

/// One `--peer`: an IPv4 peer (`CIDR=IP[,MAC]`) or, told apart by its subnet, an IPv6 one
/// (`CIDR=IPv6,MAC`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaticPeer {
    V4(Peer),
    V6(Peer6),
}

impl FromStr for StaticPeer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let subnet = s.split_once('=').map_or(s, |(subnet, _)| subnet);
        if subnet.contains(':') {
            s.parse().map(StaticPeer::V6)
        } else {
            s.parse().map(StaticPeer::V4)
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Underlay interface that carries the tunnel.
    #[arg(long)]
    pub iface: String,
    /// This host's tunnel endpoint address (flannel's PublicIP). Without it and --subnet, the
    /// network is IPv6-only (--public-ipv6 and --subnet6).
    #[arg(long)]
    pub public_ip: Option<Ipv4Addr>,
    /// This host's container subnet, e.g. 10.244.1.0/24.
    #[arg(long)]
    pub subnet: Option<Ipv4Network>,
    /// The whole overlay network, routed to the overlay device [default: the /16 around --subnet].
    #[arg(long)]
    pub network: Option<Ipv4Network>,
    /// Tunnel wire format.
    #[arg(long, value_enum, default_value_t = Backend::Vxlan)]
    pub backend: Backend,
    /// Tunnel UDP port [default: 8472 for vxlan, 8285 for udp].
    #[arg(long)]
    pub port: Option<u16>,
    /// VXLAN network identifier.
    #[arg(long, default_value_t = 1)]
    pub vni: u32,
    /// A remote host: its subnet, PublicIP and (vxlan) VtepMAC, as CIDR=IP[,MAC]; or its IPv6
    /// side as CIDR=IPv6,MAC (v6 subnet, PublicIPv6, VtepMAC). Repeatable.
    #[arg(long = "peer")]
    pub peers: Vec<StaticPeer>,
    /// This host's IPv6 tunnel endpoint (flannel's PublicIPv6): carries IPv6 too, as VXLAN
    /// over IPv6 (vxlan only). Needs --subnet6.
    #[arg(long)]
    pub public_ipv6: Option<Ipv6Addr>,
    /// This host's IPv6 container subnet, e.g. fd00:0:0:1::/64.
    #[arg(long)]
    pub subnet6: Option<Ipv6Network>,
    /// The whole IPv6 overlay network [default: the /48 around --subnet6].
    #[arg(long)]
    pub network6: Option<Ipv6Network>,
    /// Name of the overlay device.
    #[arg(long, default_value = "ovl0")]
    pub overlay_device: String,
    /// Overlay MTU [default: underlay MTU minus 28 (udp) or 50 (vxlan)].
    #[arg(long)]
    pub mtu: Option<u32>,
    /// Our VtepMAC, set on the overlay device [default: the device's own].
    #[arg(long)]
    pub vtep_mac: Option<MacAddr>,
    /// XDP attach mode for decapsulation.
    #[arg(long, value_enum, default_value_t = XdpAttach::Auto)]
    pub xdp_mode: XdpAttach,
    /// Hook that decapsulates on the underlay: auto = TC ingress on veth, XDP elsewhere.
    #[arg(long, value_enum, default_value_t = DecapAttach::Auto)]
    pub decap: DecapAttach,
    /// With TC decapsulation: frames for a container leave the container bridge (docker0, cni0)
    /// straight to the container's port, keeping their offloads; the bridge's own forwarding
    /// would segment each decapsulated 64 KB packet in software. =false keeps the bridge's path.
    #[arg(long = "bridge-redirect", num_args = 0..=1, default_missing_value = "true", default_value_t = true, action = clap::ArgAction::Set)]
    pub bridge_redirect: bool,
    /// bpf: packets between local containers and peers skip the host's stack where the kernel
    /// has the helpers; kernel: every packet through the stack.
    #[arg(long = "host-routing", value_enum, default_value_t = HostRouting::Bpf)]
    pub host_routing: HostRouting,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let format = Format::from(args.backend);
    if args.vni > 0x00ff_ffff {
        anyhow::bail!("--vni {} is out of range: a VNI has 24 bits (max 16777215)", args.vni);
    }
    let ipv4 = ipv4_side(&args)?;
    // Block the signals before attaching, so one that arrives early still finds us and the
    // datapath is cleaned up.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;

    let ipv6 = ipv6_side(&args, format)?;
    let (ipv4, ipv6) = match (ipv4, ipv6) {
        (None, None) => anyhow::bail!(
            "no address family: give --public-ip and --subnet (IPv4), --public-ipv6 and --subnet6 (IPv6), or both"
        ),
        sides => sides,
    };
    for peer in &args.peers {
        match peer {
            StaticPeer::V4(peer) if ipv4.is_none() => {
                anyhow::bail!("--peer {}: an IPv4 peer needs --public-ip and --subnet", peer.subnet)
            }
            StaticPeer::V4(peer) => peer
                .check(backend_kind(format))
                .map_err(|why| anyhow::anyhow!("--peer {}: {why}", peer.subnet))?,
            StaticPeer::V6(peer) if ipv6.is_none() => {
                anyhow::bail!("--peer {}: an IPv6 peer needs --public-ipv6 and --subnet6", peer.subnet)
            }
            StaticPeer::V6(_) => {}
        }
    }
    let programs = Programs::load().context("loading the eBPF programs")?;
    let spec = DatapathSpec {
        underlay: args.iface.clone(),
        public_ip: ipv4.map_or(Ipv4Addr::UNSPECIFIED, |(ip, _, _)| ip),
        format,
        port: args.port.unwrap_or(format.default_port()),
        vni: args.vni,
        overlay_device: args.overlay_device,
        mtu: args.mtu,
        vtep_mac: args.vtep_mac,
        pin_dir: None,
        bridge_redirect: args.bridge_redirect,
        host_routing: args.host_routing,
        xdp: args.xdp_mode,
        decap: args.decap,
    };
    let mut dp = match (ipv4, ipv6) {
        (Some((_, subnet, network)), ipv6) => {
            let mut dp = Datapath::attach(programs, spec, subnet, network)
                .with_context(|| format!("attaching the datapath to {}", args.iface))?;
            if let Some((public_ip, subnet, network)) = ipv6 {
                dp.enable_ipv6(public_ip, subnet, network)?;
            }
            dp
        }
        (None, Some((public_ip, subnet, network))) => {
            Datapath::attach_ipv6_only(programs, spec, public_ip, subnet, network)
                .with_context(|| format!("attaching the IPv6-only datapath to {}", args.iface))?
        }
        (None, None) => unreachable!("refused above"),
    };
    for peer in &args.peers {
        match *peer {
            StaticPeer::V4(peer) => dp.upsert_peer(peer)?,
            StaticPeer::V6(peer) => dp.upsert_peer6(peer)?,
        }
    }

    // One line on stdout when ready, for scripts and tests.
    let ready = serde_json::json!({
        "ready": true,
        "vtep_mac": dp.vtep_mac().to_string(),
        "mtu": dp.mtu(),
        "decap": dp.decap_hook().name(),
        "host_routing": dp.host_routing_description(),
        "xdp_mode": match (dp.decap_hook(), dp.xdp_mode()) {
            (DecapHook::Tc, _) => "none".to_string(),
            (DecapHook::Xdp, Some(m)) => format!("{m:?}"),
            (DecapHook::Xdp, None) => "adopted".into(),
        },
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{ready}")?;
    out.flush()?;
    drop(out);

    // Follow the container bridge once a second until a signal comes.
    let signal = loop {
        if let Some(signal) = wait_signal(&signals, Duration::from_secs(1))? {
            break signal;
        }
        dp.sync_bridge();
    };
    tracing::info!(?signal, "stopping");
    let counters = dp.counters()?;
    println!("{}", serde_json::json!({ "counters": counters.to_json() }));
    dp.detach()?;
    Ok(())
}

/// Our IPv4 side from the flags: PublicIP, subnet and network, or none (IPv6-only).
fn ipv4_side(args: &Args) -> anyhow::Result<Option<(Ipv4Addr, Ipv4Network, Ipv4Network)>> {
    let (public_ip, subnet) = match (args.public_ip, args.subnet) {
        (None, None) => {
            if let Some(n) = args.network {
                anyhow::bail!("--network {n} needs --public-ip and --subnet");
            }
            return Ok(None);
        }
        (Some(ip), Some(subnet)) => (ip, subnet),
        (Some(_), None) => anyhow::bail!("--public-ip needs --subnet (this host's IPv4 container subnet)"),
        (None, Some(_)) => anyhow::bail!("--subnet needs --public-ip (this host's IPv4 tunnel endpoint)"),
    };
    let network = match args.network {
        Some(n) => n,
        None => {
            let n = Ipv4Network::new(subnet.network(), 16.min(subnet.prefix()))?;
            let n = Ipv4Network::new(n.network(), n.prefix())?;
            tracing::info!(network = %n, "no --network given: routing the /16 around --subnet");
            n
        }
    };
    Ok(Some((public_ip, subnet, network)))
}

/// Our IPv6 side from the flags: all of it or none, and vxlan only.
fn ipv6_side(args: &Args, format: Format) -> anyhow::Result<Option<(Ipv6Addr, Ipv6Network, Ipv6Network)>> {
    let (public_ip, subnet) = match (args.public_ipv6, args.subnet6) {
        (None, None) => {
            if let Some(n) = args.network6 {
                anyhow::bail!("--network6 {n} needs --public-ipv6 and --subnet6");
            }
            return Ok(None);
        }
        (Some(ip), Some(subnet)) => (ip, subnet),
        (Some(_), None) => anyhow::bail!("--public-ipv6 needs --subnet6 (this host's IPv6 container subnet)"),
        (None, Some(_)) => anyhow::bail!("--subnet6 needs --public-ipv6 (this host's IPv6 tunnel endpoint)"),
    };
    if format != Format::Vxlan {
        anyhow::bail!(
            "--public-ipv6 with --backend {}: flannel's udp backend has no IPv6; IPv6 is carried by vxlan only",
            backend_kind(format).name()
        );
    }
    if subnet.network() != subnet.ip() {
        anyhow::bail!(
            "--subnet6 {subnet} has host bits set (use {}/{})",
            subnet.network(),
            subnet.prefix()
        );
    }
    let network = match args.network6 {
        Some(n) => n,
        None => {
            let n = Ipv6Network::new(subnet.network(), 48.min(subnet.prefix()))?;
            let n = Ipv6Network::new(n.network(), n.prefix())?;
            tracing::info!(network6 = %n, "no --network6 given: routing the /48 around --subnet6");
            n
        }
    };
    Ok(Some((public_ip, subnet, network)))
}

/// Wait up to `timeout` for one of the blocked `signals`.
fn wait_signal(signals: &SigSet, timeout: Duration) -> anyhow::Result<Option<Signal>> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: sigtimedwait reads the set and the timeout we own; no siginfo is asked for.
    let rc = unsafe { libc::sigtimedwait(signals.as_ref(), std::ptr::null_mut(), &ts) };
    if rc >= 0 {
        return Ok(Some(Signal::try_from(rc)?));
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
        _ => Err(std::io::Error::last_os_error().into()),
    }
}
