//! flannel's `udp` backend, in Rust: a user-space forwarder between a TUN device and a UDP
//! socket. It is our fallback where the eBPF programs cannot be loaded, and the baseline the
//! benchmarks hold the eBPF datapath against.
//!
//! Wire format, as flannel's: the UDP payload is the inner IPv4 packet, nothing before it, sent
//! to the peer's PublicIP on port 8285. The TUN device (`flannel0`, IFF_TUN | IFF_NO_PI) has
//! MTU = underlay MTU - 28 and owns the whole network through a route, so every packet for a
//! remote container comes out of it.
//!
//! Where we follow flannel's proxy (pkg/backend/udp/proxy_amd64.c) and where not:
//! - Like flannel (udp_network_amd64.go): the address is the lease's network address as a /32
//!   plus a route to the whole network, rather than the address with the network's prefix
//!   length, so the kernel adds no broadcast routes for it; the routing is the same. The inner
//!   TTL is decremented on each side; a packet for a subnet no peer owns is dropped and its
//!   sender told "net unreachable" (not for ICMP errors or non-first fragments, RFC 1122).
//!   The socket keeps the kernel's default buffer sizes, as flannel's does: under bulk TCP the
//!   receiving socket overflows and drops (UDP RcvbufErrors), which TCP then paces around.
//! - Unlike flannel, whose ICMP comes from the device's own address: an incoming packet with a
//!   local source address is a martian to the kernel, so flannel's reply never reaches the
//!   sender. Ours comes from the unreachable destination, which routes back through the TUN
//!   and passes even strict reverse-path filtering.
//! - Unlike flannel, which writes whatever arrives to the TUN: received packets must come from
//!   a known peer's address, carry a whole IPv4 packet whose source is in that peer's subnet and
//!   whose destination is in ours (the checks our XDP decap makes). Each drop is counted by
//!   reason.
//!
//! Two plain threads, one per direction, each reusing one buffer. Both file descriptors are
//! read without blocking and waited on with poll(2) and a short timeout, so `stop` is noticed
//! within [`POLL_INTERVAL`]; sends to peers block (a full socket buffer slows the sender down
//! rather than dropping) with a timeout of the same length.
use std::{
    ffi::c_char,
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use ipnetwork::Ipv4Network;
use overlay_common::{
    Format,
    accept::{InnerAddresses, Ipv4Subnet, Refusal, SenderSubnets, accept_tunnel_packet},
    csum::fold,
};
use serde::Serialize;

use crate::host::{HostError, netdev};

/// flannel's default port for the udp backend.
pub const DEFAULT_PORT: u16 = Format::Udp.default_port();
/// Outer IPv4 + UDP headers: the TUN's MTU is the underlay's less this.
pub const ENCAP_OVERHEAD: u32 = Format::Udp.overhead();
/// How long a forwarding thread waits for a packet before it looks at the stop flag again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Large enough for any UDP payload and any packet a TUN hands out, so nothing is cut short.
const BUF_LEN: usize = 65536;
const IPV4_MIN_HEADER: usize = 20;
const IPPROTO_ICMP: u8 = 1;
/// IPv4 header (at most 60) + 8 bytes of the offending packet, plus our IPv4 and ICMP headers.
const ICMP_UNREACHABLE_MAX: usize = 20 + 8 + 60 + 8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunUdpSpec {
    /// TUN device name, e.g. `flannel0`; a `%d` in it lets the kernel pick the number.
    pub device: String,
    /// Address the UDP socket binds to, and so the outer source of what we send. flannel binds
    /// the external interface's address (`IfaceAddr`), which is the lease's PublicIP unless
    /// `--public-ip` names a NAT address; pass that interface address. 0.0.0.0 also works, but
    /// then the kernel picks the source per route and peers drop whatever does not come from
    /// the PublicIP they know us by.
    pub public_ip: Ipv4Addr,
    /// UDP port we listen on and send to on every peer (flannel's `Port`, default 8285).
    pub port: u16,
    /// Our lease, e.g. 10.244.7.0/24.
    pub subnet: Ipv4Network,
    /// The whole network, e.g. 10.244.0.0/16: routed to the TUN.
    pub network: Ipv4Network,
    /// MTU of the TUN device: underlay MTU - [`ENCAP_OVERHEAD`].
    pub mtu: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TunUdpError {
    #[error("/dev/net/tun missing: load the tun module (modprobe tun): {0}")]
    TunMissing(#[source] io::Error),
    #[error("opening /dev/net/tun: {0}")]
    TunOpen(#[source] io::Error),
    #[error("creating TUN device {device}: {source}{hint}")]
    TunCreate {
        device: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("configuring TUN device {device}: `{command}` failed: {message}")]
    Command {
        device: String,
        command: String,
        message: String,
    },
    #[error("binding the UDP socket to {addr}: {source}")]
    Bind {
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("UDP socket {addr}: {what}: {source}")]
    Socket {
        addr: SocketAddrV4,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("invalid udp backend settings: {0}")]
    Spec(String),
    #[error("starting forwarding thread {name}: {source}")]
    Thread {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("forwarding thread {0} panicked")]
    ThreadPanicked(String),
}

/// Why a packet was not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Out of the TUN, for an address no peer's subnet holds.
    NoPeer,
    /// Not IPv4 (e.g. IPv6 the kernel routed to the TUN, or junk on the port).
    NotIpv4,
    /// Shorter than its IPv4 header or total length say.
    Truncated,
    /// IPv4 header with an impossible length field.
    Malformed,
    /// TTL would reach zero.
    TtlExpired,
    /// Received from an address that is no peer's PublicIP.
    UnknownSender,
    /// Received from a peer, with an inner source outside that peer's subnet.
    SpoofedSource,
    /// Received from a peer, for an address outside our subnet.
    NotOurSubnet,
    /// sendto(2) to the peer failed.
    SendFailed,
    /// write(2) to the TUN failed.
    TunWriteFailed,
}

/// What the forwarder did, since it started. A snapshot; the threads go on counting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TunUdpCounters {
    /// Packets read from the TUN and sent to a peer; bytes are inner IPv4 bytes.
    pub sent_packets: u64,
    pub sent_bytes: u64,
    /// Packets received from peers and written to the TUN; bytes are inner IPv4 bytes.
    pub received_packets: u64,
    pub received_bytes: u64,
    /// "Net unreachable" answers written back to the TUN for [`DropReason::NoPeer`] drops.
    pub icmp_unreachable_sent: u64,
    pub drop_no_peer: u64,
    pub drop_not_ipv4: u64,
    pub drop_truncated: u64,
    pub drop_malformed: u64,
    pub drop_ttl_expired: u64,
    pub drop_unknown_sender: u64,
    pub drop_spoofed_source: u64,
    pub drop_not_our_subnet: u64,
    pub drop_send_failed: u64,
    pub drop_tun_write_failed: u64,
}

impl TunUdpCounters {
    pub fn drops(&self) -> u64 {
        self.drop_no_peer
            + self.drop_not_ipv4
            + self.drop_truncated
            + self.drop_malformed
            + self.drop_ttl_expired
            + self.drop_unknown_sender
            + self.drop_spoofed_source
            + self.drop_not_our_subnet
            + self.drop_send_failed
            + self.drop_tun_write_failed
    }
}

/// The counters as the threads update them. Each field is written by one thread only, so the
/// relaxed increments never contend.
#[derive(Default)]
struct Counters {
    sent_packets: AtomicU64,
    sent_bytes: AtomicU64,
    received_packets: AtomicU64,
    received_bytes: AtomicU64,
    icmp_unreachable_sent: AtomicU64,
    drop_no_peer: AtomicU64,
    drop_not_ipv4: AtomicU64,
    drop_truncated: AtomicU64,
    drop_malformed: AtomicU64,
    drop_ttl_expired: AtomicU64,
    drop_unknown_sender: AtomicU64,
    drop_spoofed_source: AtomicU64,
    drop_not_our_subnet: AtomicU64,
    drop_send_failed: AtomicU64,
    drop_tun_write_failed: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn dropped(&self, reason: DropReason) {
        let c = match reason {
            DropReason::NoPeer => &self.drop_no_peer,
            DropReason::NotIpv4 => &self.drop_not_ipv4,
            DropReason::Truncated => &self.drop_truncated,
            DropReason::Malformed => &self.drop_malformed,
            DropReason::TtlExpired => &self.drop_ttl_expired,
            DropReason::UnknownSender => &self.drop_unknown_sender,
            DropReason::SpoofedSource => &self.drop_spoofed_source,
            DropReason::NotOurSubnet => &self.drop_not_our_subnet,
            DropReason::SendFailed => &self.drop_send_failed,
            DropReason::TunWriteFailed => &self.drop_tun_write_failed,
        };
        bump(c, 1);
    }

    fn snapshot(&self) -> TunUdpCounters {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TunUdpCounters {
            sent_packets: r(&self.sent_packets),
            sent_bytes: r(&self.sent_bytes),
            received_packets: r(&self.received_packets),
            received_bytes: r(&self.received_bytes),
            icmp_unreachable_sent: r(&self.icmp_unreachable_sent),
            drop_no_peer: r(&self.drop_no_peer),
            drop_not_ipv4: r(&self.drop_not_ipv4),
            drop_truncated: r(&self.drop_truncated),
            drop_malformed: r(&self.drop_malformed),
            drop_ttl_expired: r(&self.drop_ttl_expired),
            drop_unknown_sender: r(&self.drop_unknown_sender),
            drop_spoofed_source: r(&self.drop_spoofed_source),
            drop_not_our_subnet: r(&self.drop_not_our_subnet),
            drop_send_failed: r(&self.drop_send_failed),
            drop_tun_write_failed: r(&self.drop_tun_write_failed),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Peer table

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PeerRoute {
    subnet: Ipv4Network,
    public_ip: Ipv4Addr,
}

/// Remote subnets and the PublicIP that owns each, longest prefix first so the first match is
/// the longest. A linear scan, as flannel's: clusters have tens to hundreds of leases, and the
/// forwarding threads see the table only through an immutable snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PeerTable {
    routes: Vec<PeerRoute>,
}

impl PeerTable {
    /// Add or repoint a subnet (host bits ignored); true when the table changed.
    fn upsert(&mut self, subnet: Ipv4Network, public_ip: Ipv4Addr) -> bool {
        let subnet = normalize(subnet);
        if let Some(r) = self.routes.iter_mut().find(|r| r.subnet == subnet) {
            let changed = r.public_ip != public_ip;
            r.public_ip = public_ip;
            return changed;
        }
        let at = self
            .routes
            .iter()
            .position(|r| r.subnet.prefix() < subnet.prefix())
            .unwrap_or(self.routes.len());
        self.routes.insert(at, PeerRoute { subnet, public_ip });
        true
    }

    fn remove(&mut self, subnet: Ipv4Network) -> bool {
        let subnet = normalize(subnet);
        let before = self.routes.len();
        self.routes.retain(|r| r.subnet != subnet);
        self.routes.len() != before
    }

    /// The peer whose subnet holds `ip` with the longest prefix.
    fn lookup(&self, ip: Ipv4Addr) -> Option<&PeerRoute> {
        self.routes.iter().find(|r| r.subnet.contains(ip))
    }

    fn is_peer_address(&self, ip: Ipv4Addr) -> bool {
        self.routes.iter().any(|r| r.public_ip == ip)
    }
}

fn normalize(subnet: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(subnet.network(), subnet.prefix()).expect("prefix of a valid network")
}

/// The table shared with the forwarding threads: replaced whole on each change, and a
/// generation number so a thread takes the lock only after a change, never per packet.
#[derive(Default)]
struct Shared {
    peers: RwLock<Arc<PeerTable>>,
    generation: AtomicU64,
    counters: Counters,
}

impl Shared {
    fn update(&self, change: impl FnOnce(&mut PeerTable) -> bool) -> bool {
        let mut current = self.peers.write().unwrap_or_else(PoisonError::into_inner);
        let mut table = PeerTable::clone(&current);
        if !change(&mut table) {
            return false;
        }
        *current = Arc::new(table);
        // After the store: a thread that sees the new generation finds the new table.
        self.generation.fetch_add(1, Ordering::Release);
        true
    }

    fn snapshot(&self) -> (u64, Arc<PeerTable>) {
        let generation = self.generation.load(Ordering::Acquire);
        let table = self.peers.read().unwrap_or_else(PoisonError::into_inner).clone();
        (generation, table)
    }
}

/// A forwarding thread's copy of the peer table, refreshed when the generation moves.
struct PeerView {
    shared: Arc<Shared>,
    generation: u64,
    table: Arc<PeerTable>,
}

impl PeerView {
    fn new(shared: Arc<Shared>) -> Self {
        let (generation, table) = shared.snapshot();
        PeerView {
            shared,
            generation,
            table,
        }
    }

    fn current(&mut self) -> &PeerTable {
        if self.shared.generation.load(Ordering::Acquire) != self.generation {
            (self.generation, self.table) = self.shared.snapshot();
        }
        &self.table
    }
}

// ---------------------------------------------------------------------------------------------
// Packet checks: plain functions over byte slices.

/// The parts of an IPv4 header the forwarder looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ipv4Summary {
    header_len: usize,
    /// Total length from the header: the bytes to forward (any padding after it is not sent).
    total_len: usize,
    protocol: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
}

fn parse_ipv4(pkt: &[u8]) -> Result<Ipv4Summary, DropReason> {
    let Some(&first) = pkt.first() else {
        return Err(DropReason::Truncated);
    };
    if first >> 4 != 4 {
        return Err(DropReason::NotIpv4);
    }
    if pkt.len() < IPV4_MIN_HEADER {
        return Err(DropReason::Truncated);
    }
    let header_len = usize::from(first & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if header_len < IPV4_MIN_HEADER || total_len < header_len {
        return Err(DropReason::Malformed);
    }
    if pkt.len() < total_len {
        return Err(DropReason::Truncated);
    }
    let addr = |at: usize| Ipv4Addr::new(pkt[at], pkt[at + 1], pkt[at + 2], pkt[at + 3]);
    Ok(Ipv4Summary {
        header_len,
        total_len,
        protocol: pkt[9],
        src: addr(12),
        dst: addr(16),
    })
}

/// A packet read from the TUN: where to send it, or why not. The TTL is decremented in place
/// (flannel's proxy counts as a hop on each side).
fn route_outgoing(pkt: &mut [u8], peers: &PeerTable) -> Result<(usize, Ipv4Addr), DropReason> {
    let ip = parse_ipv4(pkt)?;
    let peer = peers.lookup(ip.dst).ok_or(DropReason::NoPeer)?;
    if !decrement_ttl(pkt) {
        return Err(DropReason::TtlExpired);
    }
    Ok((ip.total_len, peer.public_ip))
}

/// A datagram received from `sender`: the length of the IPv4 packet to write to the TUN, or
/// why it is dropped. Who may send what is the eBPF decap's rule (`accept_tunnel_packet`); the
/// TTL is then decremented in place.
fn accept_incoming(
    pkt: &mut [u8],
    sender: Ipv4Addr,
    our_subnet: Ipv4Network,
    peers: &PeerTable,
) -> Result<usize, DropReason> {
    let known = peers.is_peer_address(sender).then_some(SentBy { peers, sender });
    let ours = Ipv4Subnet {
        addr: our_subnet.network().octets(),
        prefix_len: our_subnet.prefix(),
    };
    let ip = accept_tunnel_packet(known, ours, || parse_ipv4(pkt))?;
    if !decrement_ttl(pkt) {
        return Err(DropReason::TtlExpired);
    }
    Ok(ip.total_len)
}

/// A known peer's PublicIP: it may send from the subnets that are its own, that is, where the
/// source's longest-prefix owner is that peer.
struct SentBy<'a> {
    peers: &'a PeerTable,
    sender: Ipv4Addr,
}

impl SenderSubnets for SentBy<'_> {
    fn holds(&self, ip: [u8; 4]) -> bool {
        self.peers.lookup(Ipv4Addr::from(ip)).map(|p| p.public_ip) == Some(self.sender)
    }
}

impl InnerAddresses for Ipv4Summary {
    fn source(&self) -> [u8; 4] {
        self.src.octets()
    }

    fn destination(&self) -> [u8; 4] {
        self.dst.octets()
    }
}

impl From<Refusal> for DropReason {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::UnknownPeer => DropReason::UnknownSender,
            Refusal::SpoofedSource => DropReason::SpoofedSource,
            Refusal::NotOurSubnet => DropReason::NotOurSubnet,
        }
    }
}

/// Decrement the TTL of a parsed IPv4 packet and patch its header checksum incrementally
/// (RFC 1624, eqn. 3); false when the packet must not be forwarded any more.
fn decrement_ttl(pkt: &mut [u8]) -> bool {
    if pkt[8] <= 1 {
        return false;
    }
    let old = u16::from_be_bytes([pkt[8], pkt[9]]);
    pkt[8] -= 1;
    let new = u16::from_be_bytes([pkt[8], pkt[9]]);
    let check = u16::from_be_bytes([pkt[10], pkt[11]]);
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    pkt[10..12].copy_from_slice(&fold(sum).to_be_bytes());
    true
}

/// RFC 1071 checksum over any number of bytes.
fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    fold(sum)
}

/// ICMP types that report errors: never answered with another error (RFC 1122 3.2.2).
fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
}

/// Build the ICMP "destination unreachable: net unreachable" answer to `offender` (a packet
/// that no peer route covers) into `out`; its length, or `None` where none is due.
fn net_unreachable(offender: &[u8], out: &mut [u8; ICMP_UNREACHABLE_MAX]) -> Option<usize> {
    let ip = parse_ipv4(offender).ok()?;
    let offender = &offender[..ip.total_len];
    let frag_offset = u16::from_be_bytes([offender[6], offender[7]]) & 0x1fff;
    if frag_offset != 0 {
        return None;
    }
    if ip.protocol == IPPROTO_ICMP && offender.get(ip.header_len).is_none_or(|&t| is_icmp_error(t)) {
        return None;
    }
    let bad_source = ip.src.is_unspecified() || ip.src.is_broadcast() || ip.src.is_multicast() || ip.src.is_loopback();
    if bad_source || ip.dst.is_multicast() || ip.dst.is_broadcast() {
        return None;
    }
    let quoted = offender.len().min(ip.header_len + 8);
    let len = 28 + quoted;
    out[..len].fill(0);
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    out[8] = 64;
    out[9] = IPPROTO_ICMP;
    // From the unreachable address itself: see the module comment for why not ours.
    out[12..16].copy_from_slice(&ip.dst.octets());
    out[16..20].copy_from_slice(&ip.src.octets());
    let check = internet_checksum(&out[..20]);
    out[10..12].copy_from_slice(&check.to_be_bytes());
    out[20] = 3; // destination unreachable
    out[21] = 0; // net unreachable
    out[28..len].copy_from_slice(&offender[..quoted]);
    let check = internet_checksum(&out[20..len]);
    out[22..24].copy_from_slice(&check.to_be_bytes());
    Some(len)
}

// ---------------------------------------------------------------------------------------------
// The device, the socket, the threads.

/// A running forwarder. Dropping it stops the threads and removes the TUN device, as
/// [`TunUdp::stop`] does.
pub struct TunUdp {
    device: String,
    local: SocketAddrV4,
    subnet: Ipv4Network,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TunUdp {
    /// Create and configure the TUN device, bind the socket, start forwarding. Run it in the
    /// network namespace the device and socket belong in: the forwarding threads only use the
    /// file descriptors, and the `ip` commands run in the calling thread's namespace.
    pub fn start(spec: TunUdpSpec) -> Result<Self, TunUdpError> {
        validate(&spec)?;
        let (tun, device) = open_tun(&spec.device)?;
        // From here on, an error closes the TUN fd, which removes the device with its address
        // and route.
        configure_tun(&device, &spec)?;
        set_nonblocking(&tun).map_err(|source| TunUdpError::TunCreate {
            device: device.clone(),
            hint: "",
            source,
        })?;
        let local = SocketAddrV4::new(spec.public_ip, spec.port);
        let socket = UdpSocket::bind(local).map_err(|source| TunUdpError::Bind { addr: local, source })?;
        socket
            .set_write_timeout(Some(POLL_INTERVAL))
            .map_err(|source| TunUdpError::Socket {
                addr: local,
                what: "setting the send timeout",
                source,
            })?;

        let mut forwarder = TunUdp {
            device,
            local,
            subnet: normalize(spec.subnet),
            shared: Arc::default(),
            stop: Arc::default(),
            threads: Vec::new(),
        };
        let tun = Arc::new(tun);
        let socket = Arc::new(socket);
        let to_peers = TunToUdp {
            tun: tun.clone(),
            socket: socket.clone(),
            port: spec.port,
            peers: PeerView::new(forwarder.shared.clone()),
            stop: forwarder.stop.clone(),
        };
        let from_peers = UdpToTun {
            tun,
            socket,
            subnet: forwarder.subnet,
            peers: PeerView::new(forwarder.shared.clone()),
            stop: forwarder.stop.clone(),
        };
        // If the second spawn fails, dropping `forwarder` stops the first thread.
        forwarder.spawn("tun-udp-send", move || to_peers.run())?;
        forwarder.spawn("tun-udp-recv", move || from_peers.run())?;
        tracing::info!(
            device = %forwarder.device,
            local = %local,
            subnet = %spec.subnet,
            network = %spec.network,
            mtu = spec.mtu,
            "udp backend forwarding between TUN and socket"
        );
        Ok(forwarder)
    }

    fn spawn(&mut self, name: &'static str, f: impl FnOnce() + Send + 'static) -> Result<(), TunUdpError> {
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|source| TunUdpError::Thread { name, source })?;
        self.threads.push(handle);
        Ok(())
    }

    /// Route `subnet` to the peer at `public_ip` (a new lease, or a lease whose PublicIP
    /// changed). Our own lease is never a peer.
    pub fn upsert_peer(&self, subnet: Ipv4Network, public_ip: Ipv4Addr) {
        if normalize(subnet) == self.subnet {
            tracing::debug!(%subnet, "not adding our own lease as a peer");
            return;
        }
        if self.shared.update(|t| t.upsert(subnet, public_ip)) {
            tracing::info!(%subnet, %public_ip, device = %self.device, "udp backend: peer added");
        }
    }

    pub fn remove_peer(&self, subnet: Ipv4Network) {
        if self.shared.update(|t| t.remove(subnet)) {
            tracing::info!(%subnet, device = %self.device, "udp backend: peer removed");
        }
    }

    /// The peer table, longest prefix first.
    pub fn peers(&self) -> Vec<(Ipv4Network, Ipv4Addr)> {
        let (_, table) = self.shared.snapshot();
        table.routes.iter().map(|r| (r.subnet, r.public_ip)).collect()
    }

    pub fn counters(&self) -> TunUdpCounters {
        self.shared.counters.snapshot()
    }

    /// The TUN device's name (the kernel's choice where the spec's name had `%d`).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Where the socket is bound.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Stop both threads and remove the TUN device (closing its last file descriptor does).
    pub fn stop(mut self) -> Result<(), TunUdpError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), TunUdpError> {
        if self.threads.is_empty() {
            return Ok(());
        }
        self.stop.store(true, Ordering::Relaxed);
        let mut result = Ok(());
        for handle in self.threads.drain(..) {
            let name = handle.thread().name().unwrap_or("?").to_string();
            if handle.join().is_err() {
                result = Err(TunUdpError::ThreadPanicked(name));
            }
        }
        tracing::info!(device = %self.device, counters = ?self.counters(), "udp backend stopped");
        result
    }
}

impl Drop for TunUdp {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("udp backend: {e}");
        }
    }
}

fn validate(spec: &TunUdpSpec) -> Result<(), TunUdpError> {
    let bad = |m: String| Err(TunUdpError::Spec(m));
    let name = &spec.device;
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name == "."
        || name == ".."
        || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace() || !c.is_ascii())
    {
        return bad(format!(
            "device name {name:?}: must be 1 to {} ASCII characters without '/', ':' or spaces",
            libc::IFNAMSIZ - 1
        ));
    }
    if spec.port == 0 {
        return bad("port 0: peers need a fixed port to send to".into());
    }
    if spec.subnet.prefix() < spec.network.prefix() || !spec.network.contains(spec.subnet.network()) {
        return bad(format!("subnet {} is not inside network {}", spec.subnet, spec.network));
    }
    if !(68..=65535 - ENCAP_OVERHEAD).contains(&spec.mtu) {
        return bad(format!(
            "MTU {}: must be between 68 and {}",
            spec.mtu,
            65535 - ENCAP_OVERHEAD
        ));
    }
    Ok(())
}

/// Open /dev/net/tun and attach it to a new TUN device named `name` (IFF_TUN | IFF_NO_PI:
/// bare IPv4 packets, no packet-information prefix). Returns the fd and the device's name.
fn open_tun(name: &str) -> Result<(OwnedFd, String), TunUdpError> {
    // SAFETY: a NUL-terminated path; the fd is owned at once.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => TunUdpError::TunMissing(e),
            _ => TunUdpError::TunOpen(e),
        });
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req) } < 0 {
        let source = io::Error::last_os_error();
        let hint = match source.raw_os_error() {
            Some(libc::EBUSY) => " (a TUN device of that name is in use: is another flanneld or overlay running?)",
            Some(libc::EINVAL) => " (a device of that name exists and is not a TUN device: remove it)",
            Some(libc::EPERM) => " (needs CAP_NET_ADMIN)",
            _ => "",
        };
        return Err(TunUdpError::TunCreate {
            device: name.to_string(),
            hint,
            source,
        });
    }
    let actual: Vec<u8> = req.ifr_name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    Ok((fd, String::from_utf8_lossy(&actual).into_owned()))
}

/// MTU, up, the lease's network address as a /32, and the whole network routed to the device.
fn configure_tun(device: &str, spec: &TunUdpSpec) -> Result<(), TunUdpError> {
    let ip = |args: &[&str]| {
        netdev::ip(args).map(|_| ()).map_err(|e| match e {
            HostError::Command { command, message } => TunUdpError::Command {
                device: device.to_string(),
                command,
                message,
            },
            other => TunUdpError::Command {
                device: device.to_string(),
                command: format!("ip {}", args.join(" ")),
                message: other.to_string(),
            },
        })
    };
    // Nothing to say over IPv6 here; without it the kernel does not route router
    // solicitations into the TUN. Best effort: IPv6 may be off altogether.
    let _ = netdev::sysctl_set(&format!("net/ipv6/conf/{device}/disable_ipv6"), "1");
    let mtu = spec.mtu.to_string();
    ip(&["link", "set", "dev", device, "mtu", &mtu, "up"])?;
    let addr = format!("{}/32", spec.subnet.network());
    ip(&["addr", "replace", &addr, "dev", device])?;
    let network = normalize(spec.network).to_string();
    ip(&["route", "replace", &network, "dev", device])?;
    Ok(())
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Wait up to `timeout` for `events` on `fd`; false on timeout or interruption.
fn wait_for(fd: RawFd, events: libc::c_short, timeout: Duration) -> bool {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one pollfd, valid for the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) > 0 }
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Write one packet to the TUN. A TUN write does not block in practice (its socket's send
/// buffer is unlimited); should it ever say EAGAIN, wait briefly and try again.
fn write_tun(fd: RawFd, pkt: &[u8]) -> io::Result<()> {
    for _ in 0..3 {
        // SAFETY: `pkt` is valid for reads of its length.
        let n = unsafe { libc::write(fd, pkt.as_ptr().cast(), pkt.len()) };
        if n >= 0 {
            if n as usize == pkt.len() {
                return Ok(());
            }
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {n} of {} bytes", pkt.len()),
            ));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                wait_for(fd, libc::POLLOUT, Duration::from_millis(10));
            }
            _ => return Err(e),
        }
    }
    Err(io::ErrorKind::WouldBlock.into())
}

/// recvfrom(2) without blocking (the socket itself blocks, for sends): the datagram's length
/// and its sender's address.
fn recv_from(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Ipv4Addr)> {
    // SAFETY: sockaddr_in is plain data.
    let mut from: libc::sockaddr_in = unsafe { zeroed() };
    let mut from_len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `buf` and `from` are valid for writes of the lengths given.
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            (&mut from as *mut libc::sockaddr_in).cast(),
            &mut from_len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((n as usize, Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr))))
}

/// Log a failure that repeats per packet only on its first few occurrences.
fn log_sometimes(count: u64, what: &str, e: &io::Error) {
    if count < 5 || count.is_power_of_two() {
        tracing::warn!(occurrences = count + 1, "udp backend: {what}: {e}");
    }
}

/// TUN to peers: read a packet, find the peer that owns its destination, send it there.
struct TunToUdp {
    tun: Arc<OwnedFd>,
    socket: Arc<UdpSocket>,
    port: u16,
    peers: PeerView,
    stop: Arc<AtomicBool>,
}

impl TunToUdp {
    fn run(mut self) {
        let tun = self.tun.as_raw_fd();
        let shared = self.peers.shared.clone();
        let counters = &shared.counters;
        let mut buf = vec![0u8; BUF_LEN];
        let mut icmp = [0u8; ICMP_UNREACHABLE_MAX];
        let mut read_errors = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let n = match read_fd(tun, &mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_for(tun, libc::POLLIN, POLL_INTERVAL);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log_sometimes(read_errors, "reading the TUN", &e);
                    read_errors += 1;
                    // Not a busy loop if the error persists (the device was deleted under us).
                    std::thread::sleep(POLL_INTERVAL);
                    continue;
                }
            };
            let pkt = &mut buf[..n];
            match route_outgoing(pkt, self.peers.current()) {
                Ok((len, peer)) => {
                    let dst = SocketAddrV4::new(peer, self.port);
                    match self.socket.send_to(&pkt[..len], dst) {
                        Ok(_) => {
                            bump(&counters.sent_packets, 1);
                            bump(&counters.sent_bytes, len as u64);
                        }
                        Err(e) => {
                            let seen = counters.drop_send_failed.load(Ordering::Relaxed);
                            log_sometimes(seen, &format!("sending to {dst}"), &e);
                            counters.dropped(DropReason::SendFailed);
                        }
                    }
                }
                Err(DropReason::NoPeer) => {
                    counters.dropped(DropReason::NoPeer);
                    if let Some(len) = net_unreachable(pkt, &mut icmp) {
                        // Counted before the write: the sender may read the counters as soon
                        // as the error reaches it. Taken back if the write fails.
                        bump(&counters.icmp_unreachable_sent, 1);
                        if write_tun(tun, &icmp[..len]).is_err() {
                            counters.icmp_unreachable_sent.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(reason) => counters.dropped(reason),
            }
        }
    }
}

/// Peers to TUN: receive a datagram, check it, write the inner packet to the TUN.
struct UdpToTun {
    tun: Arc<OwnedFd>,
    socket: Arc<UdpSocket>,
    subnet: Ipv4Network,
    peers: PeerView,
    stop: Arc<AtomicBool>,
}

impl UdpToTun {
    fn run(mut self) {
        let (tun, sock) = (self.tun.as_raw_fd(), self.socket.as_raw_fd());
        let shared = self.peers.shared.clone();
        let counters = &shared.counters;
        let mut buf = vec![0u8; BUF_LEN];
        let mut recv_errors = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let (n, sender) = match recv_from(sock, &mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_for(sock, libc::POLLIN, POLL_INTERVAL);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. an ICMP error queued on the socket; the next call goes on.
                    log_sometimes(recv_errors, "receiving from the socket", &e);
                    recv_errors += 1;
                    continue;
                }
            };
            let pkt = &mut buf[..n];
            match accept_incoming(pkt, sender, self.subnet, self.peers.current()) {
                Ok(len) => match write_tun(tun, &pkt[..len]) {
                    Ok(()) => {
                        bump(&counters.received_packets, 1);
                        bump(&counters.received_bytes, len as u64);
                    }
                    Err(e) => {
                        let seen = counters.drop_tun_write_failed.load(Ordering::Relaxed);
                        log_sometimes(seen, "writing to the TUN", &e);
                        counters.dropped(DropReason::TunWriteFailed);
                    }
                },
                Err(reason) => counters.dropped(reason),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// A well-formed IPv4 packet with `payload` bytes of payload and a valid header checksum.
    fn packet(src: &str, dst: &str, protocol: u8, ttl: u8, payload: usize) -> Vec<u8> {
        let total = 20 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[8] = ttl;
        p[9] = protocol;
        p[12..16].copy_from_slice(&ip(src).octets());
        p[16..20].copy_from_slice(&ip(dst).octets());
        let c = internet_checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        for (i, b) in p[20..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    fn table(entries: &[(&str, &str)]) -> PeerTable {
        let mut t = PeerTable::default();
        for (subnet, public_ip) in entries {
            t.upsert(net(subnet), ip(public_ip));
        }
        t
    }

    #[test]
    fn lookup_takes_the_longest_prefix_whatever_the_insertion_order() {
        let t = table(&[
            ("10.244.0.0/16", "192.0.2.1"),
            ("10.244.7.0/24", "192.0.2.7"),
            ("10.244.7.128/25", "192.0.2.8"),
            ("10.245.0.0/24", "192.0.2.9"),
        ]);
        let cases = [
            ("10.244.7.200", Some("192.0.2.8")),
            ("10.244.7.5", Some("192.0.2.7")),
            ("10.244.8.5", Some("192.0.2.1")),
            ("10.245.0.255", Some("192.0.2.9")),
            ("10.245.1.0", None),
            ("10.243.255.255", None),
        ];
        for (dst, want) in cases {
            assert_eq!(t.lookup(ip(dst)).map(|p| p.public_ip), want.map(ip), "lookup {dst}");
        }
        let prefixes: Vec<u8> = t.routes.iter().map(|r| r.subnet.prefix()).collect();
        assert_eq!(prefixes, vec![25, 24, 24, 16]);
    }

    #[test]
    fn upsert_repoints_and_remove_forgets() {
        let mut t = table(&[("10.244.1.0/24", "192.0.2.1")]);
        assert!(!t.upsert(net("10.244.1.0/24"), ip("192.0.2.1")), "no change");
        assert!(t.upsert(net("10.244.1.7/24"), ip("192.0.2.2")), "host bits ignored");
        assert_eq!(t.routes.len(), 1);
        assert_eq!(t.lookup(ip("10.244.1.9")).unwrap().public_ip, ip("192.0.2.2"));
        assert!(t.is_peer_address(ip("192.0.2.2")));
        assert!(!t.is_peer_address(ip("192.0.2.1")));
        assert!(!t.remove(net("10.244.2.0/24")));
        assert!(t.remove(net("10.244.1.0/24")));
        assert!(t.lookup(ip("10.244.1.9")).is_none());
    }

    #[test]
    fn threads_see_table_changes_through_the_generation() {
        let shared = Arc::new(Shared::default());
        let mut view = PeerView::new(shared.clone());
        assert!(view.current().lookup(ip("10.244.2.1")).is_none());
        assert!(shared.update(|t| t.upsert(net("10.244.2.0/24"), ip("192.0.2.2"))));
        assert_eq!(
            view.current().lookup(ip("10.244.2.1")).unwrap().public_ip,
            ip("192.0.2.2")
        );
        assert!(!shared.update(|t| t.remove(net("10.244.9.0/24"))));
        assert!(shared.update(|t| t.remove(net("10.244.2.0/24"))));
        assert!(view.current().lookup(ip("10.244.2.1")).is_none());
    }

    #[test]
    fn parse_ipv4_sorts_out_bad_packets() {
        let good = packet("10.244.1.2", "10.244.2.2", 6, 64, 40);
        assert_eq!(parse_ipv4(&good).unwrap().total_len, 60);
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(parse_ipv4(&padded).unwrap().total_len, 60, "padding is not forwarded");

        assert_eq!(parse_ipv4(&[]), Err(DropReason::Truncated));
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        assert_eq!(parse_ipv4(&v6), Err(DropReason::NotIpv4));
        assert_eq!(parse_ipv4(&good[..19]), Err(DropReason::Truncated));
        assert_eq!(parse_ipv4(&good[..59]), Err(DropReason::Truncated));
        let mut short_ihl = good.clone();
        short_ihl[0] = 0x44;
        assert_eq!(parse_ipv4(&short_ihl), Err(DropReason::Malformed));
        let mut short_total = good.clone();
        short_total[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(parse_ipv4(&short_total), Err(DropReason::Malformed));
        let mut long_ihl = good.clone();
        long_ihl[0] = 0x4f; // 60-byte header in a 60-byte packet: fine
        assert_eq!(parse_ipv4(&long_ihl).unwrap().header_len, 60);
    }

    #[test]
    fn ttl_decrement_keeps_the_checksum_valid() {
        // Sweep TTLs and header contents, including checksums near 0x0000 and 0xffff.
        for ttl in 2..=255u8 {
            for id in [0u16, 0x00ff, 0xfeff, 0xffff, 0x8000, 0x1234] {
                let mut p = packet("10.244.1.2", "10.244.2.2", 17, ttl, 8);
                p[4..6].copy_from_slice(&id.to_be_bytes());
                p[10..12].fill(0);
                let c = internet_checksum(&p[..20]);
                p[10..12].copy_from_slice(&c.to_be_bytes());
                assert!(decrement_ttl(&mut p));
                assert_eq!(p[8], ttl - 1);
                assert_eq!(internet_checksum(&p[..20]), 0, "ttl {ttl} id {id:#x}");
            }
        }
        let mut p = packet("10.244.1.2", "10.244.2.2", 17, 1, 8);
        assert!(!decrement_ttl(&mut p));
        p[8] = 0;
        assert!(!decrement_ttl(&mut p), "TTL 0 does not wrap to 255");
    }

    #[test]
    fn outgoing_goes_to_the_owner_of_the_destination() {
        let t = table(&[("10.244.2.0/24", "192.0.2.2"), ("10.244.3.0/24", "192.0.2.3")]);
        let mut p = packet("10.244.1.2", "10.244.3.9", 6, 64, 100);
        p.extend_from_slice(&[0xee; 4]);
        assert_eq!(route_outgoing(&mut p, &t), Ok((120, ip("192.0.2.3"))));
        assert_eq!(p[8], 63);

        let mut p = packet("10.244.1.2", "10.244.99.9", 6, 64, 100);
        assert_eq!(route_outgoing(&mut p, &t), Err(DropReason::NoPeer));
        assert_eq!(p[8], 64, "a dropped packet is left as it was, for the ICMP quote");
        let mut p = packet("10.244.1.2", "10.244.2.9", 6, 1, 100);
        assert_eq!(route_outgoing(&mut p, &t), Err(DropReason::TtlExpired));
        let mut p = vec![0x60; 48];
        assert_eq!(route_outgoing(&mut p, &t), Err(DropReason::NotIpv4));
    }

    #[test]
    fn incoming_must_come_from_the_peer_that_owns_its_source() {
        let t = table(&[("10.244.2.0/24", "192.0.2.2"), ("10.244.3.0/24", "192.0.2.3")]);
        let ours = net("10.244.1.0/24");
        let peer2 = ip("192.0.2.2");
        type Case = (&'static str, Ipv4Addr, Vec<u8>, Result<usize, DropReason>);
        let cases: [Case; 7] = [
            ("good", peer2, packet("10.244.2.5", "10.244.1.7", 6, 64, 30), Ok(50)),
            (
                "to our device address",
                peer2,
                packet("10.244.2.0", "10.244.1.0", 1, 64, 30),
                Ok(50),
            ),
            (
                "stranger",
                ip("192.0.2.99"),
                packet("10.244.2.5", "10.244.1.7", 6, 64, 30),
                Err(DropReason::UnknownSender),
            ),
            (
                "source of another peer",
                peer2,
                packet("10.244.3.5", "10.244.1.7", 6, 64, 30),
                Err(DropReason::SpoofedSource),
            ),
            (
                "source of no peer",
                peer2,
                packet("172.16.0.1", "10.244.1.7", 6, 64, 30),
                Err(DropReason::SpoofedSource),
            ),
            (
                "not for us",
                peer2,
                packet("10.244.2.5", "10.244.3.7", 6, 64, 30),
                Err(DropReason::NotOurSubnet),
            ),
            (
                "last hop",
                peer2,
                packet("10.244.2.5", "10.244.1.7", 6, 1, 30),
                Err(DropReason::TtlExpired),
            ),
        ];
        for (what, sender, mut pkt, want) in cases {
            assert_eq!(accept_incoming(&mut pkt, sender, ours, &t), want, "{what}");
        }
        let mut truncated = packet("10.244.2.5", "10.244.1.7", 6, 64, 30);
        truncated.truncate(30);
        assert_eq!(
            accept_incoming(&mut truncated, peer2, ours, &t),
            Err(DropReason::Truncated)
        );
        let mut junk = b"hello, is this flannel?".to_vec();
        assert_eq!(accept_incoming(&mut junk, peer2, ours, &t), Err(DropReason::NotIpv4));
    }

    #[test]
    fn net_unreachable_quotes_the_offender_and_checks_out() {
        let offender = packet("10.244.1.2", "10.244.99.9", 17, 63, 100);
        let mut out = [0u8; ICMP_UNREACHABLE_MAX];
        let len = net_unreachable(&offender, &mut out).expect("an answer");
        assert_eq!(len, 20 + 8 + 20 + 8);
        let reply = &out[..len];
        let ip_hdr = parse_ipv4(reply).unwrap();
        assert_eq!(ip_hdr.total_len, len);
        assert_eq!(ip_hdr.protocol, IPPROTO_ICMP);
        assert_eq!((ip_hdr.src, ip_hdr.dst), (ip("10.244.99.9"), ip("10.244.1.2")));
        assert_eq!(internet_checksum(&reply[..20]), 0, "IPv4 header checksum");
        assert_eq!((reply[20], reply[21]), (3, 0), "type 3 code 0");
        assert_eq!(internet_checksum(&reply[20..]), 0, "ICMP checksum");
        assert_eq!(&reply[28..], &offender[..28]);
    }

    #[test]
    fn net_unreachable_is_not_sent_where_rfc_1122_forbids() {
        let mut out = [0u8; ICMP_UNREACHABLE_MAX];
        // An echo request is answered; an ICMP error is not.
        let mut echo = packet("10.244.1.2", "10.244.99.9", IPPROTO_ICMP, 64, 16);
        echo[20] = 8;
        assert!(net_unreachable(&echo, &mut out).is_some());
        let mut error = echo.clone();
        error[20] = 3;
        assert!(net_unreachable(&error, &mut out).is_none());
        // Only the first fragment.
        let mut frag = packet("10.244.1.2", "10.244.99.9", 17, 64, 16);
        frag[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        assert!(net_unreachable(&frag, &mut out).is_none());
        // Nobody to tell.
        let from_nowhere = packet("0.0.0.0", "10.244.99.9", 17, 64, 16);
        assert!(net_unreachable(&from_nowhere, &mut out).is_none());
        let to_group = packet("10.244.1.2", "239.1.1.1", 17, 64, 16);
        assert!(net_unreachable(&to_group, &mut out).is_none());
        // Short offender: quote what there is.
        let short = packet("10.244.1.2", "10.244.99.9", 17, 64, 3);
        assert_eq!(net_unreachable(&short, &mut out), Some(28 + 23));
        // Header with options: quoted whole.
        let mut opts = packet("10.244.1.2", "10.244.99.9", 17, 64, 60);
        opts[0] = 0x4f;
        assert_eq!(net_unreachable(&opts, &mut out), Some(ICMP_UNREACHABLE_MAX));
        assert!(net_unreachable(&[0x60; 40], &mut out).is_none());
    }

    #[test]
    fn internet_checksum_handles_odd_lengths() {
        // RFC 1071's example bytes: sum 0xddf2, checksum 0x220d.
        assert_eq!(
            internet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
        assert_eq!(internet_checksum(&[0xab]), !0xab00);
    }

    #[test]
    fn spec_validation_names_the_problem() {
        let good = TunUdpSpec {
            device: "flannel0".into(),
            public_ip: ip("192.0.2.1"),
            port: DEFAULT_PORT,
            subnet: net("10.244.7.0/24"),
            network: net("10.244.0.0/16"),
            mtu: 1472,
        };
        assert!(validate(&good).is_ok());
        let bad = [
            TunUdpSpec {
                device: "a-name-longer-than-15".into(),
                ..good.clone()
            },
            TunUdpSpec {
                device: "".into(),
                ..good.clone()
            },
            TunUdpSpec {
                port: 0,
                ..good.clone()
            },
            TunUdpSpec {
                subnet: net("10.245.7.0/24"),
                ..good.clone()
            },
            TunUdpSpec {
                subnet: net("10.0.0.0/8"),
                ..good.clone()
            },
            TunUdpSpec {
                mtu: 40,
                ..good.clone()
            },
        ];
        for spec in bad {
            let e = validate(&spec).expect_err(&format!("{spec:?}"));
            assert!(matches!(e, TunUdpError::Spec(_)), "{e}");
        }
    }
}
