//! Putting the programs on a host: the overlay device whose egress encapsulates, XDP or TC
//! ingress on the underlay that decapsulates, the route and sysctls they need; pinning, so a
//! restart adopts a running datapath without a gap; detaching and cleanup.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType, XdpMode,
    links::{FdLink, LinkError, PinnedLink},
    tc::{NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
    xdp::{XdpLink, XdpLinkId},
};
use ipnetwork::Ipv4Network;
use overlay_common::{
    DatapathConfig, Format, MAP_CONFIG, MAP_CONFIG6, MAP_COUNTERS, MAP_PEERS, MAP_PEERS_BY_IP, MAP_PEERS6,
    MAP_PEERS6_BY_IP, PROG_DECAP, PROG_DECAP_TC, PROG_ENCAP,
};

use super::{
    Datapath, Ipv4Side,
    bridge::BridgeFinder,
    programs::{DatapathError, Programs},
};
use crate::host::{MacAddr, netdev};

/// Which hook decapsulates on the underlay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DecapAttach {
    /// TC ingress on veth underlays, XDP elsewhere.
    #[default]
    Auto,
    /// XDP, in the mode --xdp-mode says.
    Xdp,
    /// TC ingress (TCX): keeps GSO across veth, where XDP disables it.
    Tc,
}

/// The hook decapsulation runs on, once [`DecapAttach`] is resolved for an underlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapHook {
    Xdp,
    Tc,
}

impl DecapHook {
    pub fn name(self) -> &'static str {
        match self {
            DecapHook::Xdp => "xdp",
            DecapHook::Tc => "tc",
        }
    }

    fn other(self) -> DecapHook {
        match self {
            DecapHook::Xdp => DecapHook::Tc,
            DecapHook::Tc => DecapHook::Xdp,
        }
    }
}

/// Resolve the decap hook for an underlay whose driver kind is `kind` (None: hardware NIC).
///
/// On veth, native XDP makes the kernel drop GSO on the peer (every 64 KB skb is segmented
/// before it crosses) and copies every frame; TC ingress keeps GSO. Generic XDP on a bare veth
/// never runs on frames a peer's TC program redirected into it (skb->redirected survives the
/// veth), so tunnel traffic would vanish: refused unless asked for with `--decap xdp`.
pub fn choose_decap(
    decap: DecapAttach,
    xdp: XdpAttach,
    underlay: &str,
    kind: Option<&str>,
) -> Result<DecapHook, DatapathError> {
    let veth = kind == Some("veth");
    match decap {
        DecapAttach::Tc => Ok(DecapHook::Tc),
        DecapAttach::Xdp => {
            if veth && xdp == XdpAttach::Generic {
                tracing::warn!(
                    interface = underlay,
                    "generic XDP on a veth sees no frames that a peer's TC program redirected into \
                     the other end; this works only if that end is a bridge port"
                );
            }
            Ok(DecapHook::Xdp)
        }
        DecapAttach::Auto if veth => match xdp {
            XdpAttach::Auto => Ok(AUTO_ON_VETH),
            XdpAttach::Native => Ok(DecapHook::Xdp),
            XdpAttach::Generic => Err(DatapathError::Config(format!(
                "--xdp-mode generic on veth underlay {underlay}: generic XDP does not run on frames \
                 that a TC program redirected into the other end of the veth (our encapsulation on \
                 the peer does), so tunnel traffic would be black-holed. Use --decap tc (the \
                 default on veth), or --decap xdp --xdp-mode generic if the other end is a bridge port"
            ))),
        },
        DecapAttach::Auto => Ok(DecapHook::Xdp),
    }
}

/// What `--decap auto` picks on a veth underlay (see the benchmark figures in the commit log).
const AUTO_ON_VETH: DecapHook = DecapHook::Tc;

/// How to attach the XDP decapsulation program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttach {
    /// Native (driver) mode where the driver supports it, generic otherwise.
    #[default]
    Auto,
    Native,
    Generic,
}

/// Everything needed to put the datapath on a host but the subnet, which the lease gives later.
#[derive(Clone, Debug)]
pub struct DatapathSpec {
    /// Underlay interface: tunnel packets leave and arrive here.
    pub underlay: String,
    pub public_ip: Ipv4Addr,
    pub format: Format,
    pub port: u16,
    pub vni: u32,
    /// Name of the overlay device whose egress encapsulates.
    pub overlay_device: String,
    /// Overlay MTU; default: underlay MTU minus the format's overhead.
    pub mtu: Option<u32>,
    /// Our VtepMAC (the overlay device's MAC); default: the device's own, kept across restarts.
    pub vtep_mac: Option<MacAddr>,
    pub xdp: XdpAttach,
    pub decap: DecapAttach,
    /// bpffs directory for pinned maps and links. With it, the datapath outlives the process
    /// (dropping a [`Datapath`] leaves it attached) and the next start adopts it; without it,
    /// dropping detaches everything.
    pub pin_dir: Option<PathBuf>,
    /// With TC decapsulation, hand frames for a container from the container bridge's egress
    /// straight to the container's port (see [`Datapath::sync_bridge`]).
    pub bridge_redirect: bool,
    /// Whether container traffic to and from peers may skip the host's stack.
    pub host_routing: super::HostRouting,
}

impl DatapathSpec {
    /// The MTU the overlay device gets: `mtu`, or the underlay's minus the format's overhead.
    pub fn effective_mtu(&self, underlay_mtu: u32) -> u32 {
        self.mtu.unwrap_or(underlay_mtu.saturating_sub(self.format.overhead()))
    }
}

/// Where one of our programs runs: encapsulation on the overlay device's egress, or
/// decapsulation on the underlay's ingress at either hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Encap,
    Decap(DecapHook),
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::Encap => PROG_ENCAP,
            Hook::Decap(DecapHook::Xdp) => PROG_DECAP,
            Hook::Decap(DecapHook::Tc) => PROG_DECAP_TC,
        }
    }

    /// The link's name in the pin directory.
    fn pin_name(self) -> &'static str {
        match self {
            Hook::Encap => "link_encap",
            Hook::Decap(DecapHook::Xdp) => "link_decap",
            Hook::Decap(DecapHook::Tc) => "link_decap_tc",
        }
    }
}

const ALL_HOOKS: [Hook; 3] = [Hook::Encap, Hook::Decap(DecapHook::Xdp), Hook::Decap(DecapHook::Tc)];

/// How this kernel takes TC programs, found by trying at the first attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    /// TCX links (6.6 and later): pinnable, stacked with other programs on the hook.
    Tcx,
    /// Classic filters under a `clsact` qdisc, over netlink (before 6.6).
    Netlink,
}

impl TcMode {
    pub fn name(self) -> &'static str {
        match self {
            TcMode::Tcx => "tcx",
            TcMode::Netlink => "netlink",
        }
    }

    /// As people know the two ways: TCX links, or filters under a clsact qdisc.
    pub fn attach_name(self) -> &'static str {
        match self {
            TcMode::Tcx => "tcx",
            TcMode::Netlink => "clsact",
        }
    }
}

/// Attach `prog` to `iface`'s `hook` through TCX, or where the kernel has no TCX, as a
/// classic filter under a clsact qdisc. The qdisc is created only if `iface` has none; the
/// returned flag says we created it (and so may remove it when it is empty again).
pub(super) fn attach_tc_probing(
    prog: &mut SchedClassifier,
    iface: &str,
    hook: TcAttachType,
) -> Result<(SchedClassifierLinkId, TcMode, bool), String> {
    let tcx = match prog.attach_with_options(iface, hook, TcAttachOptions::TcxOrder(LinkOrder::default())) {
        Ok(id) => return Ok((id, TcMode::Tcx, false)),
        Err(e) => e,
    };
    let created = if netdev::has_clsact(iface).map_err(|e| e.to_string())? {
        false
    } else {
        aya::programs::tc::qdisc_add_clsact(iface)
            .map_err(|e| format!("no TCX here ({tcx}), and adding a clsact qdisc to {iface} failed: {e}"))?;
        tracing::info!(interface = iface, reason = %tcx, "no TCX: created a clsact qdisc for classic TC filters");
        true
    };
    match prog.attach_with_options(iface, hook, TcAttachOptions::Netlink(NlOptions::default())) {
        Ok(id) => Ok((id, TcMode::Netlink, created)),
        Err(e) => {
            if created {
                remove_clsact_if_ours(iface);
            }
            Err(format!("TCX failed ({tcx}), and so did a classic TC filter: {e}"))
        }
    }
}

/// Remove the clsact qdisc we created on `iface`, unless someone's filters now hang there.
pub(super) fn remove_clsact_if_ours(iface: &str) {
    if !netdev::link_exists(iface) || !netdev::has_clsact(iface).unwrap_or(false) {
        return;
    }
    match netdev::has_tc_filters(iface) {
        Ok(false) => match netdev::tc(&["qdisc", "del", "dev", iface, "clsact"]) {
            Ok(_) => tracing::info!(interface = iface, "removed the clsact qdisc we created"),
            Err(e) => tracing::warn!(interface = iface, "removing our clsact qdisc: {e}"),
        },
        Ok(true) => tracing::info!(interface = iface, "left our clsact qdisc: other filters use it now"),
        Err(e) => tracing::warn!(interface = iface, "checking the clsact qdisc: {e}"),
    }
}

/// A classic TC filter of ours, recorded next to the pins so the next start can replace its
/// program in place (netlink filters have no link to pin). bpffs holds no regular files and
/// no names with dots, so the record is the name of a directory,
/// `<pin>_tc/<iface> <ingress|egress> <prio> <handle>`, with dots in `iface` written as `:`.
#[derive(Debug, PartialEq, Eq)]
struct NlPin {
    iface: String,
    ingress: bool,
    priority: u16,
    handle: u32,
}

impl NlPin {
    fn path(pin: &Path) -> PathBuf {
        let mut name = pin.file_name().unwrap_or_default().to_os_string();
        name.push("_tc");
        pin.with_file_name(name)
    }

    fn parse(text: &str) -> Option<NlPin> {
        let mut f = text.split_whitespace();
        let iface = f.next()?.replace(':', ".");
        let ingress = match f.next()? {
            "ingress" => true,
            "egress" => false,
            _ => return None,
        };
        Some(NlPin {
            iface,
            ingress,
            priority: f.next()?.parse().ok()?,
            handle: f.next()?.parse().ok()?,
        })
    }

    fn read(path: &Path) -> Option<NlPin> {
        let entry = std::fs::read_dir(path).ok()?.flatten().next()?;
        NlPin::parse(&entry.file_name().to_string_lossy())
    }

    fn write(&self, path: &Path) -> Result<(), DatapathError> {
        let _ = std::fs::remove_dir_all(path);
        let record = path.join(self.render());
        std::fs::create_dir_all(&record)
            .map_err(|e| DatapathError::Config(format!("recording our TC filter in {}: {e}", record.display())))
    }

    fn render(&self) -> String {
        let dir = if self.ingress { "ingress" } else { "egress" };
        format!(
            "{} {dir} {} {}",
            self.iface.replace('.', ":"),
            self.priority,
            self.handle
        )
    }

    fn link(&self) -> std::io::Result<SchedClassifierLink> {
        let hook = if self.ingress {
            TcAttachType::Ingress
        } else {
            TcAttachType::Egress
        };
        SchedClassifierLink::attached(&self.iface, hook, self.priority, self.handle.into(), None)
    }
}

/// Marker beside the pins (a directory without dots: bpffs takes nothing else): we created
/// the clsact qdisc on this interface.
fn clsact_marker(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("clsact_created_{}", iface.replace('.', ":")))
}

/// A link this process attached and owns (detached when dropped, unless pinned).
pub(super) enum OwnedLink {
    Tc(&'static str, SchedClassifierLinkId),
    Xdp(XdpLinkId),
}

pub(super) enum Links {
    /// Owned by this process: detached when dropped.
    Owned(Vec<OwnedLink>),
    /// Pinned in bpffs: they stay until [`Datapath::cleanup`] unpins them.
    Pinned,
}

/// Pinned by versions whose counter table was shorter; removed by cleanup.
const LEGACY_MAP_COUNTERS: [&str; 3] = ["OVL_COUNTERS_V1", "OVL_COUNTERS_V2", "OVL_COUNTERS_V3"];

impl Programs {
    pub(super) fn attach_tc(
        &mut self,
        program: &'static str,
        iface: &str,
        hook: TcAttachType,
    ) -> Result<(OwnedLink, TcMode, bool), DatapathError> {
        attach_tc_probing(self.tc_program(program)?, iface, hook)
            .map(|(id, mode, created)| (OwnedLink::Tc(program, id), mode, created))
            .map_err(|e| DatapathError::Config(format!("eBPF program {program} on {iface}: {e}")))
    }

    /// Leave a classic TC filter attached after we exit, and say where it is.
    fn release_netlink(&mut self, link: OwnedLink, iface: &str, ingress: bool) -> Result<NlPin, DatapathError> {
        let OwnedLink::Tc(name, id) = link else {
            return Err(DatapathError::Config("only TC filters are kept by netlink".into()));
        };
        let link = self
            .tc_program(name)?
            .take_link(id)
            .map_err(|source| DatapathError::Program { name, source })?;
        let pin = NlPin {
            iface: iface.to_string(),
            ingress,
            priority: link
                .priority()
                .map_err(|source| DatapathError::Program { name, source })?,
            handle: link
                .handle()
                .map_err(|source| DatapathError::Program { name, source })?
                .into(),
        };
        // Dropping the link would detach the filter; it is to outlive us, as pinned links do.
        std::mem::forget(link);
        Ok(pin)
    }

    /// Swap our program into a classic TC filter left by a previous run (netlink replaces the
    /// filter's program in one step).
    fn adopt_netlink(&mut self, hook: Hook, pin: &NlPin) -> Result<(), String> {
        let link = pin.link().map_err(|e| e.to_string())?;
        let prog = self.tc_program(hook.program()).map_err(|e| e.to_string())?;
        let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
        let link = prog.take_link(id).map_err(|e| e.to_string())?;
        std::mem::forget(link);
        Ok(())
    }

    pub(super) fn detach(&mut self, link: OwnedLink) -> Result<(), DatapathError> {
        match link {
            OwnedLink::Tc(name, id) => self
                .tc_program(name)?
                .detach(id)
                .map_err(|source| DatapathError::Program { name, source }),
            OwnedLink::Xdp(id) => self
                .decap_program()?
                .detach(id)
                .map_err(|source| DatapathError::Program {
                    name: PROG_DECAP,
                    source,
                }),
        }
    }

    /// Give up ownership of `link` so that it can be pinned.
    fn release_for_pin(&mut self, link: OwnedLink) -> Result<FdLink, DatapathError> {
        let (name, link): (&'static str, Result<FdLink, LinkError>) = match link {
            OwnedLink::Tc(name, id) => (
                name,
                FdLink::try_from(
                    self.tc_program(name)?
                        .take_link(id)
                        .map_err(|source| DatapathError::Program { name, source })?,
                ),
            ),
            OwnedLink::Xdp(id) => (
                PROG_DECAP,
                FdLink::try_from(
                    self.decap_program()?
                        .take_link(id)
                        .map_err(|source| DatapathError::Program {
                            name: PROG_DECAP,
                            source,
                        })?,
                ),
            ),
        };
        link.map_err(|e| DatapathError::Config(format!("link of eBPF program {name}: {e}")))
    }

    /// Swap our program into a link pinned by a previous run: atomic, no packet misses both.
    fn adopt(&mut self, hook: Hook, fd: FdLink) -> Result<(), String> {
        match hook {
            Hook::Encap | Hook::Decap(DecapHook::Tc) => {
                let link = SchedClassifierLink::try_from(fd).map_err(|e| e.to_string())?;
                let prog = self.tc_program(hook.program()).map_err(|e| e.to_string())?;
                let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
                prog.take_link(id).map(drop).map_err(|e| e.to_string())
            }
            Hook::Decap(DecapHook::Xdp) => {
                let link = XdpLink::try_from(fd).map_err(|e| e.to_string())?;
                let prog = self.decap_program().map_err(|e| e.to_string())?;
                let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
                prog.take_link(id).map(drop).map_err(|e| e.to_string())
            }
        }
    }
}

impl Datapath {
    /// Set up the device, route and sysctls, write our config into the loaded `programs` and
    /// attach them for `subnet` of `network`. With a pin directory holding a previous run's
    /// datapath, adopt it instead: the maps keep their peers and counters and the links get
    /// the new programs atomically, so traffic never stops. `programs` must have been loaded
    /// with the same pin directory ([`Programs::load_pinned`]).
    pub fn attach(
        programs: Programs,
        spec: DatapathSpec,
        subnet: Ipv4Network,
        network: Ipv4Network,
    ) -> Result<Self, DatapathError> {
        if !network.contains(subnet.network()) || subnet.prefix() < network.prefix() {
            return Err(DatapathError::Config(format!(
                "subnet {subnet} is not inside network {network}"
            )));
        }
        Self::attach_with(programs, spec, Some(Ipv4Side { subnet, network }))
    }

    /// [`Datapath::attach`] with our IPv4 side, or without one (an IPv6-only network: the
    /// caller enables IPv6 next, see `Datapath::attach_ipv6_only`).
    pub(super) fn attach_with(
        mut programs: Programs,
        spec: DatapathSpec,
        ipv4: Option<Ipv4Side>,
    ) -> Result<Self, DatapathError> {
        let underlay = netdev::link_info(&spec.underlay)?;
        let decap_hook = choose_decap(spec.decap, spec.xdp, &underlay.name, underlay.kind.as_deref())?;
        let mtu = match ipv4 {
            Some(_) => spec.effective_mtu(underlay.mtu),
            None => spec.mtu.unwrap_or(super::ipv6::ipv6_route_mtu(underlay.mtu)),
        };
        match ipv4 {
            Some(_) => {
                let overhead = spec.format.overhead();
                if mtu < 576 || mtu + overhead > underlay.mtu {
                    return Err(DatapathError::Config(format!(
                        "overlay MTU {mtu} does not fit: underlay {} has MTU {} and the {:?} format needs {overhead} bytes",
                        underlay.name, underlay.mtu, spec.format
                    )));
                }
                netdev::sysctl_set("net/ipv4/ip_forward", "1")?;
                // Decapsulated packets arrive on the underlay with overlay sources routed via
                // the overlay device: strict reverse-path filtering would drop them.
                netdev::sysctl_set(&format!("net/ipv4/conf/{}/rp_filter", underlay.name), "2")?;
            }
            None => super::ipv6::check_ipv6_only(&spec, mtu, &underlay)?,
        }

        let created = netdev::create_overlay_device(&spec.overlay_device, spec.vtep_mac)?;
        // Like flannel.1, the overlay device holds the subnet's network address as a /32, the
        // source for host-originated overlay traffic.
        let overlay = netdev::configure_overlay_device(&created.name, mtu, ipv4.map(|v4| v4.subnet.network()))?;
        let vtep_mac = overlay.mac.unwrap_or_default();
        // Without an IPv4 side the config says no format: the programs leave IPv4 alone (a
        // pinned dual-stack run's config is overwritten so).
        programs.set_config(&match ipv4 {
            Some(v4) => DatapathConfig {
                public_ip: spec.public_ip.octets(),
                subnet_addr: v4.subnet.network().octets(),
                subnet_prefix_len: v4.subnet.prefix(),
                format: spec.format as u8,
                port: spec.port,
                vni: spec.vni,
                vtep_mac: vtep_mac.0,
                _pad: [0; 2],
                underlay_ifindex: underlay.ifindex,
            },
            None => DatapathConfig::IPV4_OFF,
        })?;
        let peers = match ipv4 {
            Some(_) => programs.read_peers()?,
            None => Default::default(),
        };

        // From here on, a failure drops `dp`, which removes what was set up (unpinned runs).
        let mut dp = Datapath {
            programs,
            spec,
            ipv4,
            overlay,
            underlay,
            decap_hook,
            decap_adopted: false,
            xdp_mode: None,
            links: None,
            peers,
            ipv6: None,
            bridges: BridgeFinder::default(),
            bridge: None,
            bridge_warning: None,
            tc_mode: None,
            clsact_created: Vec::new(),
            native_xdp: None,
            host_routing: Default::default(),
        };
        dp.attach_programs()?;
        dp.start_host_routing();
        if let Some(v4) = dp.ipv4 {
            netdev::route_replace(v4.network, &dp.overlay.name)?;
        }
        dp.sync_bridge();
        tracing::info!(
            underlay = %dp.underlay.name,
            overlay = %dp.overlay.name,
            format = ?dp.spec.format,
            port = dp.spec.port,
            mtu,
            vtep_mac = %vtep_mac,
            decap = dp.decap_hook.name(),
            xdp_mode = ?dp.xdp_mode,
            tc = dp.tc_mode.map(TcMode::name),
            adopted_peers = dp.peers.len(),
            pinned = dp.spec.pin_dir.is_some(),
            ipv4 = dp.ipv4.is_some(),
            "datapath attached"
        );
        Ok(dp)
    }

    fn attach_programs(&mut self) -> Result<(), DatapathError> {
        let hooks = [Hook::Encap, Hook::Decap(self.decap_hook)];
        let Some(dir) = self.spec.pin_dir.clone() else {
            let mut owned = Vec::new();
            for hook in hooks {
                owned.push(self.attach_hook(hook)?);
            }
            self.links = Some(Links::Owned(owned));
            return Ok(());
        };
        // Hooks this run attached and pinned: undone if a later one fails, so a start that
        // fails (or falls back) leaves nothing attached behind it.
        let mut pinned_now = Vec::new();
        for hook in hooks {
            if let Err(e) = self.attach_pinned_hook(&dir, hook, &mut pinned_now) {
                for hook in pinned_now {
                    remove_pinned_hook(&dir, hook);
                }
                for iface in self.clsact_created.drain(..) {
                    remove_clsact_if_ours(&iface);
                }
                return Err(e);
            }
        }
        // Whoever removes the datapath later removes the qdiscs we created, if still empty.
        for iface in self.clsact_created.drain(..) {
            let marker = clsact_marker(&dir, &iface);
            std::fs::create_dir_all(&marker)
                .map_err(|e| DatapathError::Config(format!("recording {}: {e}", marker.display())))?;
        }
        // A previous run decapsulated on the other hook: remove it only now that ours is in
        // place, so no tunnel packet goes undecapsulated. While both run, the XDP one
        // decapsulates first and the TC one sees inner packets, which it passes.
        remove_pinned_hook(&dir, Hook::Decap(self.decap_hook.other()));
        // The programs now count in this version's table: the older one goes (its counts with it).
        for legacy in LEGACY_MAP_COUNTERS.map(|name| dir.join(name)) {
            if legacy.exists() {
                let _ = std::fs::remove_file(&legacy);
                tracing::info!(map = %legacy.display(), "removed a previous version's counter table");
            }
        }
        self.links = Some(Links::Pinned);
        Ok(())
    }

    /// Adopt what a previous run pinned for `hook` under `dir`, or attach and pin it anew (then
    /// `hook` is added to `pinned_now`).
    fn attach_pinned_hook(&mut self, dir: &Path, hook: Hook, pinned_now: &mut Vec<Hook>) -> Result<(), DatapathError> {
        let pin = dir.join(hook.pin_name());
        let nl_path = NlPin::path(&pin);
        let adopted = match NlPin::read(&nl_path) {
            Some(nl) => match self.programs.adopt_netlink(hook, &nl) {
                Ok(()) => {
                    self.tc_mode = Some(TcMode::Netlink);
                    Adopted::Yes
                }
                Err(reason) => {
                    tracing::warn!(filter = %nl_path.display(), %reason, "cannot adopt our TC filter; attaching anew");
                    let _ = std::fs::remove_dir_all(&nl_path);
                    Adopted::No
                }
            },
            None => adopt_link(&pin, |fd| self.programs.adopt(hook, fd)),
        };
        match adopted {
            Adopted::Yes => {
                self.decap_adopted |= hook != Hook::Encap;
                if hook != Hook::Decap(DecapHook::Xdp) && self.tc_mode.is_none() {
                    self.tc_mode = Some(TcMode::Tcx);
                }
                tracing::info!(link = %pin.display(), "adopted pinned link")
            }
            Adopted::No => {
                let link = self.attach_hook(hook)?;
                if matches!(link, OwnedLink::Tc(..)) && self.tc_mode == Some(TcMode::Netlink) {
                    let (iface, ingress) = match hook {
                        Hook::Encap => (self.overlay.name.clone(), false),
                        _ => (self.underlay.name.clone(), true),
                    };
                    let nl = self.programs.release_netlink(link, &iface, ingress)?;
                    nl.write(&nl_path)?;
                } else {
                    let link = self.programs.release_for_pin(link)?;
                    pin_link(link, &pin)?;
                }
                pinned_now.push(hook);
            }
        }
        Ok(())
    }

    fn attach_hook(&mut self, hook: Hook) -> Result<OwnedLink, DatapathError> {
        let underlay = self.underlay.name.clone();
        let (iface, program, direction) = match hook {
            Hook::Encap => (self.overlay.name.clone(), PROG_ENCAP, TcAttachType::Egress),
            Hook::Decap(DecapHook::Tc) => (underlay.clone(), PROG_DECAP_TC, TcAttachType::Ingress),
            Hook::Decap(DecapHook::Xdp) => (underlay.clone(), PROG_DECAP, TcAttachType::Ingress),
        };
        match hook {
            Hook::Encap | Hook::Decap(DecapHook::Tc) => {
                let (link, mode, created) = self.programs.attach_tc(program, &iface, direction)?;
                self.tc_mode = Some(mode);
                if created {
                    self.clsact_created.push(iface);
                }
                Ok(link)
            }
            Hook::Decap(DecapHook::Xdp) => {
                let xdp = self.programs.decap_program()?;
                let (link, mode) = match self.spec.xdp {
                    XdpAttach::Native => {
                        let link = xdp.attach(&underlay, XdpMode::Driver);
                        self.native_xdp = Some(link.is_ok());
                        (link, XdpMode::Driver)
                    }
                    XdpAttach::Generic => (xdp.attach(&underlay, XdpMode::Skb), XdpMode::Skb),
                    XdpAttach::Auto => match xdp.attach(&underlay, XdpMode::Driver) {
                        Ok(link) => {
                            self.native_xdp = Some(true);
                            (Ok(link), XdpMode::Driver)
                        }
                        Err(e) => {
                            self.native_xdp = Some(false);
                            tracing::warn!(
                                interface = %underlay,
                                reason = %e,
                                "native XDP not available, using generic XDP (slower)"
                            );
                            (xdp.attach(&underlay, XdpMode::Skb), XdpMode::Skb)
                        }
                    },
                };
                let link = link.map_err(|e| {
                    DatapathError::Config(format!(
                        "eBPF program {PROG_DECAP} on {underlay} (XDP {} mode): {:#}",
                        format!("{mode:?}").to_lowercase(),
                        anyhow::Error::new(e)
                    ))
                })?;
                self.xdp_mode = Some(mode);
                Ok(OwnedLink::Xdp(link))
            }
        }
    }

    pub fn spec(&self) -> &DatapathSpec {
        &self.spec
    }

    /// Whether this attachment still fits: the same subnet and network, on the same underlay
    /// device (not re-created) with the same MTU.
    pub fn fits(&self, subnet: Ipv4Network, network: Ipv4Network) -> bool {
        self.ipv4 == Some(Ipv4Side { subnet, network })
            && netdev::link_info(&self.underlay.name)
                .is_ok_and(|now| now.ifindex == self.underlay.ifindex && now.mtu == self.underlay.mtu)
    }

    /// Our PublicIP changed (the underlay renumbered): the programs read it from their config
    /// (encapsulation source, what is addressed to us); nothing is attached again.
    pub fn set_public_ip(&mut self, public_ip: std::net::Ipv4Addr) -> Result<(), DatapathError> {
        let mut config = self.programs.config()?;
        config.public_ip = public_ip.octets();
        self.programs.set_config(&config)?;
        self.spec.public_ip = public_ip;
        tracing::info!(%public_ip, "datapath: new PublicIP");
        Ok(())
    }

    /// Our VtepMAC: the overlay device's MAC, published in vxlan leases.
    pub fn vtep_mac(&self) -> MacAddr {
        self.overlay.mac.unwrap_or_default()
    }

    pub fn mtu(&self) -> u32 {
        self.overlay.mtu
    }

    /// The XDP mode chosen at attach time; None if adopted from a previous run or on TC.
    pub fn xdp_mode(&self) -> Option<XdpMode> {
        self.xdp_mode
    }

    /// The hook decapsulation runs on.
    pub fn decap_hook(&self) -> DecapHook {
        self.decap_hook
    }

    /// Whether the decap link was taken over from a previous run rather than attached anew.
    pub fn decap_adopted(&self) -> bool {
        self.decap_adopted
    }

    /// The decap hook and mode for people: `xdp driver`, `tc`, `tc adopted`.
    pub fn decap_description(&self) -> String {
        match (self.decap_hook, self.xdp_mode) {
            (hook, _) if self.decap_adopted => format!("{} adopted", hook.name()),
            (DecapHook::Xdp, Some(m)) => format!("xdp {}", format!("{m:?}").to_lowercase()),
            (hook, _) => hook.name().into(),
        }
    }

    /// How the TC programs went on: TCX links, or classic filters under clsact (before 6.6).
    pub fn tc_mode(&self) -> Option<TcMode> {
        self.tc_mode
    }

    /// Whether native XDP attached on the underlay; None when it was not tried.
    pub fn native_xdp(&self) -> Option<bool> {
        self.native_xdp
    }

    pub fn counters(&mut self) -> Result<crate::host::Counters, DatapathError> {
        self.programs.counters()
    }

    /// Stop now: detach unpinned programs and remove the overlay device; pinned datapaths are
    /// left running (use [`Datapath::cleanup`] to remove them).
    pub fn detach(mut self) -> Result<(), DatapathError> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<(), DatapathError> {
        self.detach_bridge();
        self.stop_host_routing();
        match self.links.take() {
            Some(Links::Owned(links)) => {
                for link in links {
                    self.programs.detach(link)?;
                }
                for iface in std::mem::take(&mut self.clsact_created) {
                    remove_clsact_if_ours(&iface);
                }
            }
            Some(Links::Pinned) => {
                tracing::info!(
                    pin_dir = %self.spec.pin_dir.as_deref().unwrap_or(Path::new("")).display(),
                    "datapath left attached for the next start"
                );
                return Ok(());
            }
            None => {}
        }
        if netdev::link_exists(&self.overlay.name) {
            // Takes its address and the overlay route with it.
            netdev::delete_link(&self.overlay.name)?;
            tracing::info!(overlay = %self.overlay.name, underlay = %self.underlay.name, "datapath detached");
        }
        Ok(())
    }

    /// Remove a pinned datapath: unpin (and so detach) its links, remove its pinned maps and
    /// the overlay device. Whatever is already gone is skipped.
    pub fn cleanup(pin_dir: &Path, overlay_device: &str) -> Result<(), DatapathError> {
        for hook in ALL_HOOKS {
            remove_pinned_hook(pin_dir, hook);
        }
        if let Ok(entries) = std::fs::read_dir(pin_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(iface) = name.strip_prefix("clsact_created_") {
                    remove_clsact_if_ours(&iface.replace(':', "."));
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
        let maps = [
            MAP_PEERS, MAP_PEERS_BY_IP, MAP_CONFIG, MAP_COUNTERS, MAP_PEERS6, MAP_PEERS6_BY_IP, MAP_CONFIG6,
        ];
        for name in maps.into_iter().chain(LEGACY_MAP_COUNTERS) {
            let path = pin_dir.join(name);
            if path.exists() {
                std::fs::remove_file(&path)
                    .map_err(|e| DatapathError::Config(format!("removing {}: {e}", path.display())))?;
            }
        }
        if netdev::link_exists(overlay_device) {
            netdev::delete_link(overlay_device)?;
            tracing::info!(device = overlay_device, "removed overlay device");
        }
        Ok(())
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if let Err(e) = self.detach_inner() {
            tracing::error!("detaching the datapath: {e}");
        }
    }
}

enum Adopted {
    Yes,
    No,
}

/// Take over the link pinned at `path` with `update` (which swaps in our program). A link that
/// cannot be taken over (its device was recreated, say) is unpinned, so a fresh one replaces it.
fn adopt_link(path: &Path, update: impl FnOnce(FdLink) -> Result<(), String>) -> Adopted {
    if !path.exists() {
        return Adopted::No;
    }
    let result = PinnedLink::from_pin(path)
        .map_err(|e| e.to_string())
        .and_then(|pinned| update(FdLink::from(pinned)));
    match result {
        Ok(()) => Adopted::Yes,
        Err(reason) => {
            tracing::warn!(link = %path.display(), %reason, "cannot adopt pinned link; attaching anew");
            let _ = std::fs::remove_file(path);
            Adopted::No
        }
    }
}

/// Detach what a previous run left on `hook`: its pinned link, or its classic TC filter.
fn remove_pinned_hook(dir: &Path, hook: Hook) {
    let pin = dir.join(hook.pin_name());
    if pin.exists() {
        unpin(&pin);
    }
    let nl_path = NlPin::path(&pin);
    if let Some(nl) = NlPin::read(&nl_path) {
        // Dropping an attached link's handle removes the filter.
        match nl.link() {
            Ok(link) => drop(link),
            Err(e) => tracing::warn!(filter = %nl_path.display(), "removing our TC filter: {e}"),
        }
        tracing::info!(filter = %nl_path.display(), "removed our TC filter");
    }
    let _ = std::fs::remove_dir_all(&nl_path);
}

/// Unpin (and so detach) the link pinned at `path`.
fn unpin(path: &Path) {
    match PinnedLink::from_pin(path) {
        Ok(link) => drop(link.unpin()),
        Err(_) => drop(std::fs::remove_file(path)),
    }
    tracing::info!(link = %path.display(), "unpinned");
}

fn pin_link(link: FdLink, path: &Path) -> Result<(), DatapathError> {
    link.pin(path)
        .map(drop)
        .map_err(|e| DatapathError::Config(format!("pinning {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_filter_records_round_trip() {
        let pin = NlPin {
            iface: "eth0".into(),
            ingress: true,
            priority: 49152,
            handle: 1,
        };
        assert_eq!(NlPin::parse(&pin.render()), Some(pin));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("link_decap_tc_tc");
        let pin = NlPin::parse("eth0 ingress 1 2").unwrap();
        pin.write(&path).unwrap();
        assert_eq!(NlPin::read(&path), Some(pin));
        assert_eq!(NlPin::parse("eth0 sideways 1 1"), None);
        assert_eq!(NlPin::parse("eth0 egress 70000 1"), None);
        assert_eq!(NlPin::path(Path::new("/p/link_encap")), Path::new("/p/link_encap_tc"));
        let vlan = NlPin::parse("eth0.100 ingress 1 1").unwrap();
        assert_eq!(vlan.render(), "eth0:100 ingress 1 1");
        assert_eq!(NlPin::parse(&vlan.render()), Some(vlan));
    }

    #[test]
    fn decap_hook_follows_the_underlay_driver() {
        use DecapAttach as D;
        use XdpAttach as X;
        let veth = Some("veth");
        assert_eq!(choose_decap(D::Auto, X::Auto, "eth0", None).unwrap(), DecapHook::Xdp);
        assert_eq!(
            choose_decap(D::Auto, X::Auto, "eth0", Some("bond")).unwrap(),
            DecapHook::Xdp
        );
        assert_eq!(choose_decap(D::Auto, X::Generic, "eth0", None).unwrap(), DecapHook::Xdp);
        assert_eq!(choose_decap(D::Auto, X::Auto, "eth0", veth).unwrap(), AUTO_ON_VETH);
        assert_eq!(choose_decap(D::Auto, X::Native, "eth0", veth).unwrap(), DecapHook::Xdp);
        let err = choose_decap(D::Auto, X::Generic, "eth0", veth).unwrap_err().to_string();
        assert!(err.contains("black-holed") && err.contains("--decap tc"), "{err}");
        assert_eq!(choose_decap(D::Xdp, X::Generic, "eth0", veth).unwrap(), DecapHook::Xdp);
        assert_eq!(choose_decap(D::Tc, X::Auto, "eth0", None).unwrap(), DecapHook::Tc);
        assert_eq!(choose_decap(D::Xdp, X::Auto, "eth0", veth).unwrap(), DecapHook::Xdp);
    }
}
