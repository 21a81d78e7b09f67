//! The eBPF datapath seen from user space.
//!
//! - [`Programs`]: the object loaded into the kernel (verified, not attached) and typed access
//!   to its maps. Packet tests run these programs through BPF_PROG_TEST_RUN.
//! - [`Datapath`]: programs attached to a host: the overlay device whose egress encapsulates,
//!   XDP or TC ingress on the underlay that decapsulates, the route and sysctls they need.
//!   Dropping it detaches everything it attached and removes the device it created.
//! - [`bridge`]: the container bridge's forwarding database, mirrored for the program on its
//!   egress.
pub mod bridge;
pub mod netdev;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    str::FromStr,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap as BpfHashMap, LpmTrie, MapError, PerCpuArray, lpm_trie::Key},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId},
        xdp::{XdpLink, XdpLinkId},
    },
};
use ipnetwork::Ipv4Network;
pub use overlay_common::Format;
use overlay_common::{
    Counter, CounterIndex, DatapathConfig, MAP_BRIDGE_FDB, MAP_BRIDGE_PORTS, MAP_CONFIG, MAP_COUNTERS, MAP_PEERS,
    MAP_PEERS_BY_IP, PROG_BRIDGE_OUT, PROG_DECAP, PROG_DECAP_TC, PROG_ENCAP, Peer, PeerSubnet,
};

/// The compiled programs, embedded at build time (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed (are you root, is BPF enabled?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("BPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("interface {name}: {reason}")]
    Interface { name: String, reason: String },
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("sysctl {key}: {message}")]
    Sysctl { key: String, message: String },
    #[error("peer {subnet}: {reason}")]
    Peer { subnet: Ipv4Network, reason: String },
    #[error("{0}")]
    Config(String),
}

/// A MAC address as flannel writes it in leases (`"VtepMAC":"aa:bb:cc:dd:ee:ff"`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "invalid MAC address {s:?}: expected six hex bytes separated by ':'"
            ));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            *o = u8::from_str_radix(p, 16)
                .ok()
                .filter(|_| p.len() == 2)
                .ok_or_else(|| format!("invalid MAC address {s:?}: {p:?} is not a hex byte"))?;
        }
        Ok(MacAddr(out))
    }
}

/// One remote host: the subnet it owns and where its tunnel ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    /// Required for vxlan (inner destination MAC); ignored for udp.
    pub vtep_mac: Option<MacAddr>,
}

impl FromStr for PeerEntry {
    type Err = String;
    /// `CIDR=IP[,MAC]`, as the `--peer` flag takes it.
    fn from_str(s: &str) -> Result<Self, String> {
        let (subnet, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("invalid peer {s:?}: expected CIDR=IP[,MAC]"))?;
        let subnet: Ipv4Network = subnet
            .parse()
            .map_err(|e| format!("invalid peer {s:?}: subnet {subnet:?}: {e}"))?;
        if subnet.network() != subnet.ip() {
            return Err(format!(
                "invalid peer {s:?}: {subnet} has host bits set (use {}/{})",
                subnet.network(),
                subnet.prefix()
            ));
        }
        let (ip, mac) = match rest.split_once(',') {
            Some((ip, mac)) => (
                ip,
                Some(mac.parse::<MacAddr>().map_err(|e| format!("invalid peer {s:?}: {e}"))?),
            ),
            None => (rest, None),
        };
        let public_ip = ip
            .parse()
            .map_err(|e| format!("invalid peer {s:?}: PublicIP {ip:?}: {e}"))?;
        Ok(PeerEntry {
            subnet,
            public_ip,
            vtep_mac: mac,
        })
    }
}

/// Per-counter totals over all CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub Vec<Counter>);

impl Counters {
    pub fn get(&self, index: CounterIndex) -> Counter {
        self.0.get(index as usize).copied().unwrap_or_default()
    }

    /// Non-zero counters by name, for logs, JSON and metrics.
    pub fn nonzero(&self) -> Vec<(&'static str, Counter)> {
        CounterIndex::ALL
            .iter()
            .map(|&i| (i.name(), self.get(i)))
            .filter(|(_, c)| c.packets != 0)
            .collect()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for &i in CounterIndex::ALL.iter() {
            let c = self.get(i);
            m.insert(
                i.name().into(),
                serde_json::json!({"packets": c.packets, "bytes": c.bytes}),
            );
        }
        serde_json::Value::Object(m)
    }
}

/// The eBPF object loaded into the kernel, programs verified, nothing attached.
pub struct Programs {
    ebpf: Ebpf,
}

impl Programs {
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_pinned(None)
    }

    /// Load with the maps pinned in `pin_dir` (a bpffs directory): maps already pinned there
    /// by a previous run are reused with their contents, missing ones are created and pinned.
    pub fn load_pinned(pin_dir: Option<&Path>) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            for name in [MAP_PEERS, MAP_PEERS_BY_IP, MAP_CONFIG, MAP_COUNTERS] {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(OBJECT)?;
        let encap: &mut SchedClassifier = program(&mut ebpf, PROG_ENCAP)?;
        encap.load().map_err(|source| DatapathError::Program {
            name: PROG_ENCAP,
            source,
        })?;
        let decap: &mut Xdp = program(&mut ebpf, PROG_DECAP)?;
        decap.load().map_err(|source| DatapathError::Program {
            name: PROG_DECAP,
            source,
        })?;
        let decap_tc: &mut SchedClassifier = program(&mut ebpf, PROG_DECAP_TC)?;
        decap_tc.load().map_err(|source| DatapathError::Program {
            name: PROG_DECAP_TC,
            source,
        })?;
        // The bridge program only speeds things up: if this kernel refuses it, the datapath
        // runs without it (sync_bridge reports that it cannot attach).
        let bridge_out: &mut SchedClassifier = program(&mut ebpf, PROG_BRIDGE_OUT)?;
        if let Err(e) = bridge_out.load() {
            tracing::warn!(
                "eBPF program {PROG_BRIDGE_OUT} does not load; the container bridge keeps its own path: {e}"
            );
        }
        Ok(Self { ebpf })
    }

    pub fn encap_program(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, PROG_ENCAP)
    }

    /// The XDP decapsulation program.
    pub fn decap_program(&mut self) -> Result<&mut Xdp, DatapathError> {
        program(&mut self.ebpf, PROG_DECAP)
    }

    /// The TC-ingress decapsulation program: the same checks and counters as the XDP one.
    pub fn decap_tc_program(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, PROG_DECAP_TC)
    }

    /// The container bridge's egress program: frames for a container straight to its port.
    pub fn bridge_program(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, PROG_BRIDGE_OUT)
    }

    /// Make the bridge maps hold `fdb` (MAC -> port ifindex); `mirror` is what they hold now
    /// and is updated as entries are written. A port that vanished meanwhile is skipped: the
    /// next reading of the FDB no longer has it.
    pub fn sync_bridge_fdb(
        &mut self,
        mirror: &mut bridge::Mirror,
        fdb: &HashMap<MacAddr, u32>,
    ) -> Result<(), DatapathError> {
        // Departed MACs go first, so a full table still takes the new ones. A MAC that cannot
        // be written is left out (its frames take the bridge) and the first failure reported
        // once the rest is done.
        let mut failed = None;
        let mut macs: BpfHashMap<_, [u8; 6], u32> = typed_map(&mut self.ebpf, MAP_BRIDGE_FDB)?;
        let gone: Vec<MacAddr> = mirror.fdb.keys().filter(|m| !fdb.contains_key(m)).copied().collect();
        for mac in gone {
            match macs.remove(&mac.0) {
                Err(source) if !not_found(&source) => {
                    return Err(DatapathError::Map {
                        name: MAP_BRIDGE_FDB,
                        source,
                    });
                }
                _ => {}
            }
            mirror.fdb.remove(&mac);
        }
        let wanted_ports: HashSet<u32> = fdb.values().copied().collect();
        let mut ports: DevMapHash<_> = typed_map(&mut self.ebpf, MAP_BRIDGE_PORTS)?;
        for &port in wanted_ports.difference(&mirror.ports.clone()) {
            match ports.insert(port, port, None, 0) {
                Ok(()) => {
                    mirror.ports.insert(port);
                }
                // The port's device went away since the FDB reading, which drops it next time
                // (the kernel says EINVAL for an ifindex with no device).
                Err(aya::maps::xdp::XdpMapError::MapError(MapError::SyscallError(e)))
                    if matches!(e.io_error.raw_os_error(), Some(libc::EINVAL | libc::ENODEV)) =>
                {
                    tracing::debug!(port, "bridge port gone before it was copied");
                }
                Err(e) => {
                    failed.get_or_insert(DatapathError::Config(format!(
                        "BPF map {MAP_BRIDGE_PORTS}: port ifindex {port}: {e}"
                    )));
                }
            }
        }
        for port in mirror.ports.clone().difference(&wanted_ports) {
            // The kernel removes a port whose device went away: not found is fine.
            match ports.remove(*port) {
                Err(source) if !not_found(&source) => {
                    return Err(DatapathError::Map {
                        name: MAP_BRIDGE_PORTS,
                        source,
                    });
                }
                _ => {}
            }
            mirror.ports.remove(port);
        }
        let mut macs: BpfHashMap<_, [u8; 6], u32> = typed_map(&mut self.ebpf, MAP_BRIDGE_FDB)?;
        for (mac, &port) in fdb {
            if mirror.fdb.get(mac) == Some(&port) {
                continue;
            }
            match macs.insert(mac.0, port, 0) {
                Ok(()) => {
                    mirror.fdb.insert(*mac, port);
                }
                Err(source) => {
                    failed.get_or_insert(DatapathError::Map {
                        name: MAP_BRIDGE_FDB,
                        source,
                    });
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    pub fn set_config(&mut self, cfg: &DatapathConfig) -> Result<(), DatapathError> {
        let mut map: Array<_, DatapathConfig> = typed_map(&mut self.ebpf, MAP_CONFIG)?;
        map.set(0, cfg, 0).map_err(|source| DatapathError::Map {
            name: MAP_CONFIG,
            source,
        })
    }

    /// Insert or replace the entries for one peer.
    pub fn upsert_peer(&mut self, peer: &PeerEntry) -> Result<(), DatapathError> {
        let value = Peer {
            public_ip: peer.public_ip.octets(),
            vtep_mac: peer.vtep_mac.unwrap_or_default().0,
            _pad: [0; 2],
        };
        let by_ip = PeerSubnet {
            addr: peer.subnet.network().octets(),
            prefix_len: peer.subnet.prefix(),
            _pad: [0; 3],
        };
        let mut peers: LpmTrie<_, [u8; 4], Peer> = typed_map(&mut self.ebpf, MAP_PEERS)?;
        peers
            .insert(&subnet_key(peer.subnet), value, 0)
            .map_err(|source| DatapathError::Map {
                name: MAP_PEERS,
                source,
            })?;
        let mut ips: BpfHashMap<_, [u8; 4], PeerSubnet> = typed_map(&mut self.ebpf, MAP_PEERS_BY_IP)?;
        ips.insert(peer.public_ip.octets(), by_ip, 0)
            .map_err(|source| DatapathError::Map {
                name: MAP_PEERS_BY_IP,
                source,
            })
    }

    /// Remove one peer's entries; absent entries are not an error. The PublicIP's entry goes
    /// only if it still names this subnet: a host that leased a new subnet keeps its PublicIP,
    /// and its old lease may expire after the new one is in.
    pub fn remove_peer(&mut self, peer: &PeerEntry) -> Result<(), DatapathError> {
        let mut peers: LpmTrie<_, [u8; 4], Peer> = typed_map(&mut self.ebpf, MAP_PEERS)?;
        match peers.remove(&subnet_key(peer.subnet)) {
            Err(source) if !not_found(&source) => {
                return Err(DatapathError::Map {
                    name: MAP_PEERS,
                    source,
                });
            }
            _ => {}
        }
        let mut ips: BpfHashMap<_, [u8; 4], PeerSubnet> = typed_map(&mut self.ebpf, MAP_PEERS_BY_IP)?;
        let key = peer.public_ip.octets();
        match ips.get(&key, 0) {
            Ok(s) if s.addr == peer.subnet.network().octets() && s.prefix_len == peer.subnet.prefix() => {}
            Err(source) if !not_found(&source) => {
                return Err(DatapathError::Map {
                    name: MAP_PEERS_BY_IP,
                    source,
                });
            }
            _ => return Ok(()),
        }
        match ips.remove(&key) {
            Err(source) if !not_found(&source) => Err(DatapathError::Map {
                name: MAP_PEERS_BY_IP,
                source,
            }),
            _ => Ok(()),
        }
    }

    /// The peers currently in the maps (non-empty when adopting a pinned datapath).
    pub fn read_peers(&mut self) -> Result<HashMap<Ipv4Network, PeerEntry>, DatapathError> {
        let peers: LpmTrie<_, [u8; 4], Peer> = typed_map(&mut self.ebpf, MAP_PEERS)?;
        let mut out = HashMap::new();
        for item in peers.iter() {
            let (key, peer) = item.map_err(|source| DatapathError::Map {
                name: MAP_PEERS,
                source,
            })?;
            let Ok(subnet) = Ipv4Network::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8) else {
                continue;
            };
            let mac = MacAddr(peer.vtep_mac);
            out.insert(
                subnet,
                PeerEntry {
                    subnet,
                    public_ip: Ipv4Addr::from(peer.public_ip),
                    vtep_mac: (mac != MacAddr::default()).then_some(mac),
                },
            );
        }
        Ok(out)
    }

    pub fn counters(&mut self) -> Result<Counters, DatapathError> {
        let map: PerCpuArray<_, Counter> = typed_map(&mut self.ebpf, MAP_COUNTERS)?;
        let mut out = Vec::with_capacity(CounterIndex::COUNT as usize);
        for i in 0..CounterIndex::COUNT {
            let per_cpu = map.get(&i, 0).map_err(|source| DatapathError::Map {
                name: MAP_COUNTERS,
                source,
            })?;
            out.push(per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            }));
        }
        Ok(Counters(out))
    }
}

/// A delete found no entry: aya reports that as the syscall's ENOENT, not as KeyNotFound.
fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

fn subnet_key(subnet: Ipv4Network) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix()), subnet.network().octets())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(DatapathError::Program {
        name,
        source: ProgramError::NotLoaded,
    })?;
    p.try_into().map_err(|source| DatapathError::Program { name, source })
}

fn typed_map<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    let map = ebpf.map_mut(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

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

/// Everything needed to put the datapath on a host.
#[derive(Clone, Debug)]
pub struct DatapathSpec {
    /// Underlay interface: tunnel packets leave and arrive here.
    pub underlay: String,
    pub public_ip: Ipv4Addr,
    /// This host's container subnet.
    pub subnet: Ipv4Network,
    /// The whole overlay network; routed to the overlay device.
    pub network: Ipv4Network,
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
}

impl DatapathSpec {
    /// The MTU the overlay device gets: `mtu`, or the underlay's minus the format's overhead.
    pub fn effective_mtu(&self, underlay_mtu: u32) -> u32 {
        self.mtu.unwrap_or(underlay_mtu.saturating_sub(self.format.overhead()))
    }
}

enum DecapLinkId {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

enum Links {
    /// Owned by this process: detached when dropped.
    Owned(SchedClassifierLinkId, DecapLinkId),
    /// Pinned in bpffs: they stay until [`Datapath::cleanup`] unpins them.
    Pinned,
}

const LINK_ENCAP: &str = "link_encap";
const LINK_DECAP: &str = "link_decap";
const LINK_DECAP_TC: &str = "link_decap_tc";
/// Pinned by versions whose counter table was shorter; removed by cleanup.
const LEGACY_MAP_COUNTERS: &str = "OVL_COUNTERS_V1";

/// The datapath attached to this host.
pub struct Datapath {
    programs: Programs,
    spec: DatapathSpec,
    overlay: netdev::LinkInfo,
    underlay: netdev::LinkInfo,
    decap_hook: DecapHook,
    /// The decap link was taken over from a previous run.
    decap_adopted: bool,
    /// None when an attachment was adopted from a previous run (its mode was chosen then), or
    /// decapsulation runs on TC.
    xdp_mode: Option<XdpMode>,
    links: Option<Links>,
    peers: HashMap<Ipv4Network, PeerEntry>,
    bridges: bridge::BridgeFinder,
    /// The container bridge our egress program is on, with what its maps hold. Owned by this
    /// process, never pinned: without the agent to keep the FDB copy current, packets take
    /// the bridge's own path.
    bridge: Option<AttachedBridge>,
    /// The last bridge trouble logged.
    bridge_warning: Option<String>,
}

struct AttachedBridge {
    device: bridge::BridgeDevice,
    link: SchedClassifierLinkId,
    mirror: bridge::Mirror,
}

impl Datapath {
    /// Set up the device, route and sysctls, load the programs, write our config and attach.
    /// With a pin directory holding a previous run's datapath, adopt it instead: the maps keep
    /// their peers and counters and the links get the new programs atomically, so traffic
    /// never stops.
    pub fn attach(spec: DatapathSpec) -> Result<Self, DatapathError> {
        if !spec.network.contains(spec.subnet.network()) || spec.subnet.prefix() < spec.network.prefix() {
            return Err(DatapathError::Config(format!(
                "subnet {} is not inside network {}",
                spec.subnet, spec.network
            )));
        }
        let underlay = netdev::link_info(&spec.underlay)?;
        let decap_hook = choose_decap(spec.decap, spec.xdp, &underlay.name, underlay.kind.as_deref())?;
        let overhead = spec.format.overhead();
        let mtu = spec.effective_mtu(underlay.mtu);
        if mtu < 576 || mtu + overhead > underlay.mtu {
            return Err(DatapathError::Config(format!(
                "overlay MTU {mtu} does not fit: underlay {} has MTU {} and the {:?} format needs {overhead} bytes",
                underlay.name, underlay.mtu, spec.format
            )));
        }
        if let Some(dir) = &spec.pin_dir {
            netdev::ensure_bpffs(dir)?;
        }

        let mut programs = Programs::load_pinned(spec.pin_dir.as_deref())?;

        netdev::sysctl_set("net/ipv4/ip_forward", "1")?;
        // Decapsulated packets arrive on the underlay with overlay sources routed via the
        // overlay device: strict reverse-path filtering would drop them.
        netdev::sysctl_set(&format!("net/ipv4/conf/{}/rp_filter", underlay.name), "2")?;

        let created = netdev::create_overlay_device(&spec.overlay_device, spec.vtep_mac)?;
        // Like flannel.1, the overlay device holds the subnet's network address as a /32, the
        // source for host-originated overlay traffic.
        let overlay = netdev::configure_overlay_device(&created.name, mtu, spec.subnet.network())?;
        let vtep_mac = overlay.mac.unwrap_or_default();
        programs.set_config(&DatapathConfig {
            public_ip: spec.public_ip.octets(),
            subnet_addr: spec.subnet.network().octets(),
            subnet_prefix_len: spec.subnet.prefix(),
            format: spec.format as u8,
            port: spec.port,
            vni: spec.vni,
            vtep_mac: vtep_mac.0,
            _pad: [0; 2],
            underlay_ifindex: underlay.ifindex,
        })?;
        let peers = programs.read_peers()?;

        // From here on, a failure drops `dp`, which removes what was set up (unpinned runs).
        let mut dp = Datapath {
            programs,
            spec,
            overlay,
            underlay,
            decap_hook,
            decap_adopted: false,
            xdp_mode: None,
            links: None,
            peers,
            bridges: bridge::BridgeFinder::default(),
            bridge: None,
            bridge_warning: None,
        };
        dp.attach_programs()?;
        netdev::route_replace(dp.spec.network, &dp.overlay.name)?;
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
            adopted_peers = dp.peers.len(),
            pinned = dp.spec.pin_dir.is_some(),
            "datapath attached"
        );
        Ok(dp)
    }

    fn attach_programs(&mut self) -> Result<(), DatapathError> {
        let Some(dir) = self.spec.pin_dir.clone() else {
            let tc = self.attach_encap()?;
            let decap = self.attach_decap()?;
            self.links = Some(Links::Owned(tc, decap));
            return Ok(());
        };
        let encap_pin = dir.join(LINK_ENCAP);
        match adopt_link(&encap_pin, |fd| {
            let link = SchedClassifierLink::try_from(fd).map_err(|e| e.to_string())?;
            let prog = self.programs.encap_program().map_err(|e| e.to_string())?;
            let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
            prog.take_link(id).map(drop).map_err(|e| e.to_string())
        }) {
            Adopted::Yes => {
                tracing::info!(link = %encap_pin.display(), "adopted pinned encap link")
            }
            Adopted::No => {
                let id = self.attach_encap()?;
                let link = self
                    .programs
                    .encap_program()?
                    .take_link(id)
                    .map_err(|source| DatapathError::Program {
                        name: PROG_ENCAP,
                        source,
                    })?;
                pin_link(FdLink::try_from(link), &encap_pin)?;
            }
        }
        let (decap_pin, other_pin) = match self.decap_hook {
            DecapHook::Xdp => (dir.join(LINK_DECAP), dir.join(LINK_DECAP_TC)),
            DecapHook::Tc => (dir.join(LINK_DECAP_TC), dir.join(LINK_DECAP)),
        };
        let hook = self.decap_hook;
        match adopt_link(&decap_pin, |fd| match hook {
            DecapHook::Xdp => {
                let link = XdpLink::try_from(fd).map_err(|e| e.to_string())?;
                let prog = self.programs.decap_program().map_err(|e| e.to_string())?;
                let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
                prog.take_link(id).map(drop).map_err(|e| e.to_string())
            }
            DecapHook::Tc => {
                let link = SchedClassifierLink::try_from(fd).map_err(|e| e.to_string())?;
                let prog = self.programs.decap_tc_program().map_err(|e| e.to_string())?;
                let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
                prog.take_link(id).map(drop).map_err(|e| e.to_string())
            }
        }) {
            Adopted::Yes => {
                self.decap_adopted = true;
                tracing::info!(link = %decap_pin.display(), "adopted pinned decap link")
            }
            Adopted::No => {
                let link = match self.attach_decap()? {
                    DecapLinkId::Xdp(id) => {
                        FdLink::try_from(self.programs.decap_program()?.take_link(id).map_err(|source| {
                            DatapathError::Program {
                                name: PROG_DECAP,
                                source,
                            }
                        })?)
                    }
                    DecapLinkId::Tc(id) => {
                        FdLink::try_from(self.programs.decap_tc_program()?.take_link(id).map_err(|source| {
                            DatapathError::Program {
                                name: PROG_DECAP_TC,
                                source,
                            }
                        })?)
                    }
                };
                pin_link(link, &decap_pin)?;
            }
        }
        // A previous run decapsulated on the other hook: remove it only now that ours is in
        // place, so no tunnel packet goes undecapsulated. While both run, the XDP one
        // decapsulates first and the TC one sees inner packets, which it passes.
        if other_pin.exists() {
            unpin(&other_pin);
        }
        // The programs now count in this version's table: the older one goes (its counts with it).
        let legacy = dir.join(LEGACY_MAP_COUNTERS);
        if legacy.exists() {
            let _ = std::fs::remove_file(&legacy);
            tracing::info!(map = %legacy.display(), "removed the previous version's counter table");
        }
        self.links = Some(Links::Pinned);
        Ok(())
    }

    fn attach_encap(&mut self) -> Result<SchedClassifierLinkId, DatapathError> {
        self.programs
            .encap_program()?
            .attach(&self.overlay.name, TcAttachType::Egress)
            .map_err(|source| DatapathError::Program {
                name: PROG_ENCAP,
                source,
            })
    }

    fn attach_decap(&mut self) -> Result<DecapLinkId, DatapathError> {
        if self.decap_hook == DecapHook::Tc {
            let underlay = self.underlay.name.clone();
            return self
                .programs
                .decap_tc_program()?
                .attach(&underlay, TcAttachType::Ingress)
                .map(DecapLinkId::Tc)
                .map_err(|source| DatapathError::Program {
                    name: PROG_DECAP_TC,
                    source,
                });
        }
        let xdp = self.programs.decap_program()?;
        let underlay = self.underlay.name.clone();
        let (link, mode) = match self.spec.xdp {
            XdpAttach::Native => (xdp.attach(&underlay, XdpMode::Driver), XdpMode::Driver),
            XdpAttach::Generic => (xdp.attach(&underlay, XdpMode::Skb), XdpMode::Skb),
            XdpAttach::Auto => match xdp.attach(&underlay, XdpMode::Driver) {
                Ok(link) => (Ok(link), XdpMode::Driver),
                Err(e) => {
                    tracing::warn!(
                        interface = %underlay,
                        reason = %e,
                        "native XDP not available, using generic XDP (slower)"
                    );
                    (xdp.attach(&underlay, XdpMode::Skb), XdpMode::Skb)
                }
            },
        };
        let link = link.map_err(|source| DatapathError::Program {
            name: PROG_DECAP,
            source,
        })?;
        self.xdp_mode = Some(mode);
        Ok(DecapLinkId::Xdp(link))
    }

    pub fn spec(&self) -> &DatapathSpec {
        &self.spec
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

    pub fn peers(&self) -> impl Iterator<Item = &PeerEntry> {
        self.peers.values()
    }

    pub fn upsert_peer(&mut self, peer: PeerEntry) -> Result<(), DatapathError> {
        if peer.subnet == self.spec.subnet {
            return Err(DatapathError::Peer {
                subnet: peer.subnet,
                reason: "is our own subnet".into(),
            });
        }
        if !self.spec.network.contains(peer.subnet.network()) {
            return Err(DatapathError::Peer {
                subnet: peer.subnet,
                reason: format!("is outside the overlay network {}", self.spec.network),
            });
        }
        if self.spec.format == Format::Vxlan && peer.vtep_mac.is_none() {
            return Err(DatapathError::Peer {
                subnet: peer.subnet,
                reason: "vxlan peer without VtepMAC".into(),
            });
        }
        if let Some(old) = self.peers.get(&peer.subnet).copied() {
            if old == peer {
                return Ok(());
            }
            // The PublicIP may have changed: drop the old reverse entry first.
            self.programs.remove_peer(&old)?;
            self.peers.remove(&peer.subnet);
            self.restore_public_ip(old.public_ip)?;
        }
        self.programs.upsert_peer(&peer)?;
        self.peers.insert(peer.subnet, peer);
        tracing::debug!(subnet = %peer.subnet, public_ip = %peer.public_ip, vtep_mac = ?peer.vtep_mac, "peer set");
        Ok(())
    }

    pub fn remove_peer(&mut self, subnet: Ipv4Network) -> Result<(), DatapathError> {
        if let Some(old) = self.peers.get(&subnet).copied() {
            self.programs.remove_peer(&old)?;
            self.peers.remove(&subnet);
            tracing::debug!(%subnet, public_ip = %old.public_ip, "peer removed");
            self.restore_public_ip(old.public_ip)?;
        }
        Ok(())
    }

    /// After a peer's entries for `ip` went: another lease of the same host (same PublicIP)
    /// takes the ingress entry back.
    fn restore_public_ip(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        match self.peers.values().find(|p| p.public_ip == ip).copied() {
            Some(other) => self.programs.upsert_peer(&other),
            None => Ok(()),
        }
    }

    pub fn counters(&mut self) -> Result<Counters, DatapathError> {
        self.programs.counters()
    }

    /// Follow the container bridge: attach our egress program to the bridge that holds our
    /// subnet's gateway address (once docker or the CNI plugin has made it, again if it is
    /// recreated) and copy its forwarding database into the maps. Call it every second or so;
    /// until it has seen a new container, that container's packets take the bridge's own
    /// (slower) path. Failures are logged: the datapath works without this, only slower.
    ///
    /// Only TC decapsulation needs it: after XDP decapsulation the kernel's GRO rebuilds plain
    /// TCP packets, which the bridge forwards with their offloads.
    pub fn sync_bridge(&mut self) {
        if !self.spec.bridge_redirect || self.decap_hook != DecapHook::Tc {
            return;
        }
        let found = self.bridges.find(self.spec.subnet, &self.overlay.name);
        if self.bridge.as_ref().map(|b| &b.device) != found.as_ref() {
            self.detach_bridge();
            let Some(device) = found else { return };
            match self.programs.bridge_program().and_then(|p| {
                p.attach(&device.name, TcAttachType::Egress)
                    .map_err(|source| DatapathError::Program {
                        name: PROG_BRIDGE_OUT,
                        source,
                    })
            }) {
                Ok(link) => {
                    tracing::info!(bridge = %device.name, "frames for containers go straight to their ports");
                    self.bridge_warning = None;
                    self.bridge = Some(AttachedBridge {
                        device,
                        link,
                        mirror: bridge::Mirror::default(),
                    });
                }
                Err(e) => {
                    self.warn_bridge(format!(
                        "cannot attach to the container bridge {} (packets take the bridge's own path): {e}",
                        device.name
                    ));
                    return;
                }
            }
        }
        let Some(attached) = self.bridge.as_mut() else { return };
        let name = &attached.device.name;
        let result = match bridge::fdb(attached.device.ifindex) {
            Ok(fdb) => self
                .programs
                .sync_bridge_fdb(&mut attached.mirror, &fdb)
                .map_err(|e| format!("copying the forwarding database of {name}: {e}")),
            Err(e) => Err(format!("reading the forwarding database of {name}: {e}")),
        };
        match result {
            Ok(()) => self.bridge_warning = None,
            Err(why) => self.warn_bridge(why),
        }
    }

    /// Once per distinct trouble, not once a second: the next tick tries again anyway.
    fn warn_bridge(&mut self, why: String) {
        if self.bridge_warning.as_ref() != Some(&why) {
            tracing::warn!("{why}");
            self.bridge_warning = Some(why);
        }
    }

    fn detach_bridge(&mut self) {
        let Some(mut old) = self.bridge.take() else { return };
        // A bridge that was deleted took our link with it: nothing to detach then.
        if let Ok(p) = self.programs.bridge_program()
            && let Err(e) = p.detach(old.link)
        {
            tracing::debug!(bridge = %old.device.name, "detaching from the bridge: {e}");
        }
        if let Err(e) = self.programs.sync_bridge_fdb(&mut old.mirror, &HashMap::new()) {
            tracing::warn!("clearing the bridge maps: {e}");
        }
        tracing::info!(bridge = %old.device.name, "detached from the container bridge");
    }

    /// Stop now: detach unpinned programs and remove the overlay device; pinned datapaths are
    /// left running (use [`Datapath::cleanup`] to remove them).
    pub fn detach(mut self) -> Result<(), DatapathError> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<(), DatapathError> {
        self.detach_bridge();
        match self.links.take() {
            Some(Links::Owned(tc, decap)) => {
                self.programs
                    .encap_program()?
                    .detach(tc)
                    .map_err(|source| DatapathError::Program {
                        name: PROG_ENCAP,
                        source,
                    })?;
                match decap {
                    DecapLinkId::Xdp(id) => {
                        self.programs
                            .decap_program()?
                            .detach(id)
                            .map_err(|source| DatapathError::Program {
                                name: PROG_DECAP,
                                source,
                            })?
                    }
                    DecapLinkId::Tc(id) => {
                        self.programs
                            .decap_tc_program()?
                            .detach(id)
                            .map_err(|source| DatapathError::Program {
                                name: PROG_DECAP_TC,
                                source,
                            })?
                    }
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
        for name in [LINK_ENCAP, LINK_DECAP, LINK_DECAP_TC] {
            let path = pin_dir.join(name);
            if path.exists() {
                unpin(&path);
            }
        }
        for name in [
            MAP_PEERS, MAP_PEERS_BY_IP, MAP_CONFIG, MAP_COUNTERS, LEGACY_MAP_COUNTERS,
        ] {
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

/// Unpin (and so detach) the link pinned at `path`.
fn unpin(path: &Path) {
    match PinnedLink::from_pin(path) {
        Ok(link) => drop(link.unpin()),
        Err(_) => drop(std::fs::remove_file(path)),
    }
    tracing::info!(link = %path.display(), "unpinned");
}

fn pin_link(link: Result<FdLink, LinkError>, path: &Path) -> Result<(), DatapathError> {
    let link = link.map_err(|e| DatapathError::Config(format!("link for {}: {e}", path.display())))?;
    link.pin(path)
        .map(drop)
        .map_err(|e| DatapathError::Config(format!("pinning {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_flag_parses_and_rejects() {
        let p: PeerEntry = "10.244.2.0/24=192.168.1.2,aa:bb:cc:dd:ee:0f".parse().unwrap();
        assert_eq!(p.subnet.to_string(), "10.244.2.0/24");
        assert_eq!(p.public_ip, Ipv4Addr::new(192, 168, 1, 2));
        assert_eq!(p.vtep_mac.unwrap().to_string(), "aa:bb:cc:dd:ee:0f");
        let p: PeerEntry = "10.244.2.0/24=192.168.1.2".parse().unwrap();
        assert_eq!(p.vtep_mac, None);
        for bad in [
            "10.244.2.0/24", "10.244.2.1/24=1.2.3.4", "10.244.2.0/33=1.2.3.4", "10.244.2.0/24=1.2.3",
            "10.244.2.0/24=1.2.3.4,aa:bb", "10.244.2.0/24=1.2.3.4,aa:bb:cc:dd:ee:zz",
        ] {
            let err = bad.parse::<PeerEntry>().unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
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
