//! Types shared by the eBPF datapath (`overlay-ebpf`) and the node agent (`overlay-user`).
//!
//! Every map key and value is defined once here, `#[repr(C)]`, with explicit padding and a
//! compile-time size check, so the kernel and user side can never disagree on a layout. Map
//! names carry a version: bump it when a layout changes so a pinned map of the old layout is
//! never read with the new one.
#![no_std]

pub mod accept;
pub mod adjust_room;
pub mod csum;
pub mod wire;

/// Longest-prefix-match table: destination subnet -> [`Peer`]. Egress lookup.
pub const MAP_PEERS: &str = "OVL_PEERS_V1";
/// Exact table: peer PublicIP -> [`PeerSubnet`]. Ingress check of the outer source.
pub const MAP_PEERS_BY_IP: &str = "OVL_PEERS_BY_IP_V1";
/// One-entry array holding this host's [`DatapathConfig`].
pub const MAP_CONFIG: &str = "OVL_CONFIG_V1";
/// Per-CPU array of [`Counter`], indexed by [`CounterIndex`].
pub const MAP_COUNTERS: &str = "OVL_COUNTERS_V4";
/// IPv6 (vxlan only, as flannel's `flannel-v6.<VNI>`): longest-prefix-match table, remote v6
/// subnet -> [`Peer6`].
pub const MAP_PEERS6: &str = "OVL_PEERS6_V1";
/// IPv6: exact table, peer PublicIPv6 -> [`PeerSubnet6`].
pub const MAP_PEERS6_BY_IP: &str = "OVL_PEERS6_BY_IP_V1";
/// IPv6: one-entry array holding this host's [`DatapathConfig6`].
pub const MAP_CONFIG6: &str = "OVL_CONFIG6_V1";
/// Exact table: container MAC -> ifindex of its port on the container bridge (the agent's copy
/// of the bridge's forwarding database). Not pinned: it belongs to the running agent.
pub const MAP_BRIDGE_FDB: &str = "OVL_BRIDGE_FDB_V1";
/// Device map of the bridge's live ports (ifindex -> ifindex). The kernel deletes an entry
/// when its device goes away, so a stale FDB entry never sends a packet into the void.
pub const MAP_BRIDGE_PORTS: &str = "OVL_BRIDGE_PORTS_V1";

/// Exact table: local container IPv4 address -> [`LocalEndpoint`] (its port on the container
/// bridge and its MAC), for host routing's delivery straight into the container. Not pinned:
/// the agent keeps it current.
pub const MAP_LOCAL_ENDPOINTS: &str = "OVL_LOCAL_ENDPOINTS_V1";
/// One-entry array holding this host's [`HostRoutingConfig`]. Not pinned.
pub const MAP_HOST_ROUTING: &str = "OVL_HOST_ROUTING_V1";

/// Upper bound on containers behind one host's bridge.
pub const MAX_BRIDGE_PORTS: u32 = 16384;

/// Upper bound on peers (leases) in one network: a /8 cut into /24s.
pub const MAX_PEERS: u32 = 65536;

/// Program names as they appear in the object file.
pub const PROG_ENCAP: &str = "overlay_encap";
pub const PROG_DECAP: &str = "overlay_decap";
pub const PROG_DECAP_TC: &str = "overlay_decap_tc";
pub const PROG_BRIDGE_OUT: &str = "overlay_bridge_out";
/// Never attached: run at start on made-up packets to ask the kernel which
/// `bpf_skb_adjust_room` flags it takes ([`adjust_room`]).
pub const PROG_PROBE_ADJUST_ROOM: &str = "overlay_probe_adjust_room";
/// Host routing: TC ingress of each container's host-side veth (to remote subnets, straight
/// to the underlay) and of the underlay (to a local container, straight into its namespace).
pub const PROG_FROM_CONTAINER: &str = "overlay_from_container";
pub const PROG_TO_CONTAINER: &str = "overlay_to_container";

/// Tunnel wire format, chosen per network (flannel's `Backend.Type`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// flannel's udp backend: the inner IPv4 packet is the UDP payload.
    Udp = 1,
    /// RFC 7348 VXLAN, as flannel's vxlan backend configures the kernel device.
    Vxlan = 2,
}

impl Format {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Udp),
            2 => Some(Self::Vxlan),
            _ => None,
        }
    }

    /// Bytes the encapsulation adds in front of the inner IPv4 packet.
    pub const fn overhead(self) -> u32 {
        match self {
            Self::Udp => wire::IPV4_LEN + wire::UDP_LEN,
            Self::Vxlan => wire::IPV4_LEN + wire::UDP_LEN + wire::VXLAN_LEN + wire::ETH_LEN,
        }
    }

    pub const fn default_port(self) -> u16 {
        match self {
            Self::Udp => 8285,
            Self::Vxlan => 8472,
        }
    }
}

/// Value of [`MAP_PEERS`]: where to send traffic for one remote subnet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Outer destination, network byte order.
    pub public_ip: [u8; 4],
    /// Inner destination MAC for vxlan (the peer's VtepMAC); unused for udp.
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Peer>() == 12);

/// Value of [`MAP_PEERS_BY_IP`]: the subnet a peer may send from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerSubnet {
    /// Subnet base address, network byte order.
    pub addr: [u8; 4],
    pub prefix_len: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PeerSubnet>() == 8);

impl PeerSubnet {
    pub const fn contains(&self, ip: [u8; 4]) -> bool {
        subnet_contains(self.addr, self.prefix_len, ip)
    }
}

/// Value of [`MAP_PEERS6`]: where to send traffic for one remote IPv6 subnet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer6 {
    /// Outer destination (the peer's PublicIPv6), network byte order.
    pub public_ip: [u8; 16],
    /// Inner destination MAC (the VtepMAC of the peer's v6 device).
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Peer6>() == 24);

/// Value of [`MAP_PEERS6_BY_IP`]: the IPv6 subnet a peer may send from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerSubnet6 {
    /// Subnet base address, network byte order.
    pub addr: [u8; 16],
    pub prefix_len: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PeerSubnet6>() == 20);

impl PeerSubnet6 {
    pub const fn contains(&self, ip: [u8; 16]) -> bool {
        subnet6_contains(self.addr, self.prefix_len, ip)
    }
}

/// Value of [`MAP_CONFIG6`] (index 0): this host's side of the IPv6 tunnel. The IPv6 datapath
/// is vxlan only (flannel's udp backend has no IPv6), between PublicIPv6s.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathConfig6 {
    /// Our PublicIPv6: outer source on egress, required outer destination on ingress.
    pub public_ip: [u8; 16],
    /// Our IPv6 container subnet: inner destinations we accept on ingress.
    pub subnet_addr: [u8; 16],
    pub subnet_prefix_len: u8,
    /// 1 once configured; 0 (an empty map slot) leaves IPv6 alone.
    pub enabled: u8,
    /// Tunnel UDP port, host byte order.
    pub port: u16,
    /// VXLAN network identifier (24 bits used).
    pub vni: u32,
    /// Inner source MAC (our VtepMAC for IPv6).
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Underlay interface: the route lookup towards peers is made through it.
    pub underlay_ifindex: u32,
    /// Largest inner IPv6 packet that fits the underlay once wrapped: a larger one that the
    /// kernel will not segment is refused (the overlay route's MTU has the stack send ICMPv6
    /// "packet too big" before it gets here).
    pub mtu: u32,
}
const _: () = assert!(core::mem::size_of::<DatapathConfig6>() == 56);

/// Value of [`MAP_CONFIG`] (index 0): this host's side of the tunnel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Our PublicIP: outer source on egress, required outer destination on ingress.
    pub public_ip: [u8; 4],
    /// Our container subnet: inner destinations we accept on ingress.
    pub subnet_addr: [u8; 4],
    pub subnet_prefix_len: u8,
    /// [`Format`] as u8.
    pub format: u8,
    /// Tunnel UDP port, host byte order.
    pub port: u16,
    /// VXLAN network identifier (24 bits used).
    pub vni: u32,
    /// Inner source MAC for vxlan (our VtepMAC).
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Underlay interface: the route lookup towards peers is made through it.
    pub underlay_ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 28);

impl DatapathConfig {
    /// The config of a datapath without IPv4 (an IPv6-only network): no format, so
    /// decapsulation passes IPv4 frames untouched and encapsulation drops them as unconfigured,
    /// whatever IPv4 peers a pinned earlier run left in the maps.
    pub const IPV4_OFF: DatapathConfig = DatapathConfig {
        public_ip: [0; 4],
        subnet_addr: [0; 4],
        subnet_prefix_len: 0,
        format: 0,
        port: 0,
        vni: 0,
        vtep_mac: [0; 6],
        _pad: [0; 2],
        underlay_ifindex: 0,
    };

    pub const fn format(&self) -> Option<Format> {
        Format::from_u8(self.format)
    }
}

/// Value of [`MAP_LOCAL_ENDPOINTS`]: where a local container's packets are handed over.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// The container's port on the bridge: the host-side end of its veth.
    pub port_ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<LocalEndpoint>() == 12);

/// How the host-routing programs forward towards peers.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostRoutingMode {
    /// Programs pass every packet to the stack (`--host-routing=kernel`, or not set up yet).
    Off = 0,
    /// Encapsulate in the [`DatapathConfig`]'s format towards the peer's PublicIP.
    Encap = 1,
    /// No encapsulation: route to the peer's PublicIP as next hop (eBPF host-gw).
    Route = 2,
}

/// Value of [`MAP_HOST_ROUTING`] (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRoutingConfig {
    /// The container bridge's MAC: containers address routed frames to it, and frames we
    /// deliver to them come from it, so their neighbour entry for the gateway stays right.
    pub bridge_mac: [u8; 6],
    /// [`HostRoutingMode`] as u8.
    pub mode: u8,
    pub _pad: u8,
    /// Largest packet that goes out whole; larger non-GSO ones go to the stack, which answers
    /// "fragmentation needed" (or fragments).
    pub mtu: u32,
}
const _: () = assert!(core::mem::size_of::<HostRoutingConfig>() == 12);

impl HostRoutingConfig {
    pub const fn mode(&self) -> HostRoutingMode {
        match self.mode {
            1 => HostRoutingMode::Encap,
            2 => HostRoutingMode::Route,
            _ => HostRoutingMode::Off,
        }
    }
}

/// Packets and bytes; one per [`CounterIndex`] per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Index into [`MAP_COUNTERS`]. Every drop has a reason, and every reason a counter.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterIndex {
    EncapUdp = 0,
    EncapVxlan = 1,
    DecapUdp = 2,
    DecapVxlan = 3,
    /// Egress: no peer owns the destination subnet.
    DropNoPeer = 4,
    /// Egress: frame on the overlay device is not IP we carry (IPv4; IPv6 once enabled), or its
    /// header is cut short. The name predates IPv6 and stays for the metrics' sake.
    DropNotIpv4 = 5,
    /// Egress: the kernel refused to make room for the outer headers.
    DropEncapFailed = 6,
    /// Egress: no route or neighbour towards the peer's PublicIP.
    DropNoRoute = 7,
    /// Ingress: tunnel packet whose outer source is not a known peer.
    DropUnknownPeer = 8,
    /// Ingress: inner source outside the sending peer's subnet.
    DropSpoofedSource = 9,
    /// Ingress: inner destination outside our subnet.
    DropNotOurSubnet = 10,
    /// Ingress: tunnel packet too short for its headers, or with an invalid inner header.
    DropMalformed = 11,
    /// Ingress: VXLAN header without the I flag or with another VNI.
    DropWrongVni = 12,
    /// Ingress: first fragment of a tunnel packet; the datapath does not reassemble.
    DropFragment = 13,
    /// Ingress: the decapsulated frame could not be rewritten.
    DropDecapFailed = 14,
    /// Datapath not configured yet (config map empty or invalid).
    DropNoConfig = 15,
    /// Bridge egress: a frame handed straight to its container's port.
    BridgeRedirect = 16,
    /// Bridge egress: a unicast frame for a MAC with no live port in our FDB copy; the bridge
    /// forwards it (in software, if it was decapsulated: see overlay-ebpf's bridge.rs).
    BridgeUnknownPort = 17,
    /// Host routing: a packet from the underlay handed straight into a local container.
    ShortcutToContainer = 18,
    /// Host routing: a container's packet sent straight to the underlay towards its peer.
    ShortcutFromContainer = 19,
    /// Host routing: a container's packet larger than the MTU (not GSO), handed to the stack
    /// so it answers "fragmentation needed".
    ShortcutOversize = 20,
    /// IPv6 inner packets wrapped in VXLAN over IPv6.
    EncapVxlan6 = 21,
    DecapVxlan6 = 22,
    /// Egress: an IPv6 packet too big for the underlay once wrapped, and not one the kernel
    /// segments (the overlay route's MTU normally stops it first, with "packet too big").
    DropTooBig = 23,
}

impl CounterIndex {
    pub const COUNT: u32 = 24;
    pub const ALL: [CounterIndex; Self::COUNT as usize] = [
        Self::EncapUdp,
        Self::EncapVxlan,
        Self::DecapUdp,
        Self::DecapVxlan,
        Self::DropNoPeer,
        Self::DropNotIpv4,
        Self::DropEncapFailed,
        Self::DropNoRoute,
        Self::DropUnknownPeer,
        Self::DropSpoofedSource,
        Self::DropNotOurSubnet,
        Self::DropMalformed,
        Self::DropWrongVni,
        Self::DropFragment,
        Self::DropDecapFailed,
        Self::DropNoConfig,
        Self::BridgeRedirect,
        Self::BridgeUnknownPort,
        Self::ShortcutToContainer,
        Self::ShortcutFromContainer,
        Self::ShortcutOversize,
        Self::EncapVxlan6,
        Self::DecapVxlan6,
        Self::DropTooBig,
    ];

    /// Stable snake_case name, used in metrics and the status output.
    pub const fn name(self) -> &'static str {
        match self {
            Self::EncapUdp => "encap_udp",
            Self::EncapVxlan => "encap_vxlan",
            Self::DecapUdp => "decap_udp",
            Self::DecapVxlan => "decap_vxlan",
            Self::DropNoPeer => "drop_no_peer",
            Self::DropNotIpv4 => "drop_not_ipv4",
            Self::DropEncapFailed => "drop_encap_failed",
            Self::DropNoRoute => "drop_no_route",
            Self::DropUnknownPeer => "drop_unknown_peer",
            Self::DropSpoofedSource => "drop_spoofed_source",
            Self::DropNotOurSubnet => "drop_not_our_subnet",
            Self::DropMalformed => "drop_malformed",
            Self::DropWrongVni => "drop_wrong_vni",
            Self::DropFragment => "drop_fragment",
            Self::DropDecapFailed => "drop_decap_failed",
            Self::DropNoConfig => "drop_no_config",
            Self::BridgeRedirect => "bridge_redirect",
            Self::BridgeUnknownPort => "bridge_unknown_port",
            Self::ShortcutToContainer => "shortcut_to_container",
            Self::ShortcutFromContainer => "shortcut_from_container",
            Self::ShortcutOversize => "shortcut_oversize",
            Self::EncapVxlan6 => "encap_vxlan6",
            Self::DecapVxlan6 => "decap_vxlan6",
            Self::DropTooBig => "drop_too_big",
        }
    }

    pub const fn encap(format: Format) -> Self {
        match format {
            Format::Udp => Self::EncapUdp,
            Format::Vxlan => Self::EncapVxlan,
        }
    }

    pub const fn decap(format: Format) -> Self {
        match format {
            Format::Udp => Self::DecapUdp,
            Format::Vxlan => Self::DecapVxlan,
        }
    }
}

/// Why the datapath dropped a packet: what the programs' `try_*` functions return. Each reason
/// has its own counter ([`DropReason::counter`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    NoConfig,
    NotIpv4,
    NoPeer,
    EncapFailed,
    NoRoute,
    UnknownPeer,
    SpoofedSource,
    NotOurSubnet,
    Malformed,
    WrongVni,
    Fragment,
    DecapFailed,
    TooBig,
}

impl DropReason {
    pub const ALL: [DropReason; 13] = [
        Self::NoConfig,
        Self::NotIpv4,
        Self::NoPeer,
        Self::EncapFailed,
        Self::NoRoute,
        Self::UnknownPeer,
        Self::SpoofedSource,
        Self::NotOurSubnet,
        Self::Malformed,
        Self::WrongVni,
        Self::Fragment,
        Self::DecapFailed,
        Self::TooBig,
    ];

    pub const fn counter(self) -> CounterIndex {
        match self {
            Self::NoConfig => CounterIndex::DropNoConfig,
            Self::NotIpv4 => CounterIndex::DropNotIpv4,
            Self::NoPeer => CounterIndex::DropNoPeer,
            Self::EncapFailed => CounterIndex::DropEncapFailed,
            Self::NoRoute => CounterIndex::DropNoRoute,
            Self::UnknownPeer => CounterIndex::DropUnknownPeer,
            Self::SpoofedSource => CounterIndex::DropSpoofedSource,
            Self::NotOurSubnet => CounterIndex::DropNotOurSubnet,
            Self::Malformed => CounterIndex::DropMalformed,
            Self::WrongVni => CounterIndex::DropWrongVni,
            Self::Fragment => CounterIndex::DropFragment,
            Self::DecapFailed => CounterIndex::DropDecapFailed,
            Self::TooBig => CounterIndex::DropTooBig,
        }
    }
}

impl From<accept::Refusal> for DropReason {
    #[inline(always)]
    fn from(r: accept::Refusal) -> Self {
        match r {
            accept::Refusal::UnknownPeer => Self::UnknownPeer,
            accept::Refusal::SpoofedSource => Self::SpoofedSource,
            accept::Refusal::NotOurSubnet => Self::NotOurSubnet,
        }
    }
}

/// Whether `ip` lies in `addr/prefix_len` (all network byte order).
pub const fn subnet_contains(addr: [u8; 4], prefix_len: u8, ip: [u8; 4]) -> bool {
    if prefix_len == 0 {
        return true;
    }
    if prefix_len > 32 {
        return false;
    }
    let mask = u32::MAX << (32 - prefix_len as u32);
    (u32::from_be_bytes(addr) & mask) == (u32::from_be_bytes(ip) & mask)
}

/// Whether `ip` lies in `addr/prefix_len` (IPv6, network byte order).
pub const fn subnet6_contains(addr: [u8; 16], prefix_len: u8, ip: [u8; 16]) -> bool {
    if prefix_len > 128 {
        return false;
    }
    // Two 64-bit halves: the BPF backend has no 128-bit shifts.
    let p = prefix_len as u32;
    let hi_mask = half_mask(if p > 64 { 64 } else { p });
    let lo_mask = half_mask(p.saturating_sub(64));
    (be64(addr, 0) ^ be64(ip, 0)) & hi_mask == 0 && (be64(addr, 8) ^ be64(ip, 8)) & lo_mask == 0
}

/// The mask of the first `bits` (0..=64) bits of a 64-bit word.
const fn half_mask(bits: u32) -> u64 {
    if bits == 0 { 0 } else { u64::MAX << (64 - bits) }
}

const fn be64(a: [u8; 16], at: usize) -> u64 {
    u64::from_be_bytes([
        a[at],
        a[at + 1],
        a[at + 2],
        a[at + 3],
        a[at + 4],
        a[at + 5],
        a[at + 6],
        a[at + 7],
    ])
}

/// The 32-bit words of an IPv6 address folded into one, for [`flow_hash`].
pub const fn fold_ipv6(ip: [u8; 16]) -> [u8; 4] {
    let mut out = [0u8; 4];
    let mut i = 0;
    while i < 16 {
        out[i % 4] ^= ip[i];
        i += 1;
    }
    out
}

/// Hash of an inner flow (addresses, protocol, and the L4 ports where there are any, else 0):
/// what spreads tunnel flows over the receiver's queues. A few ALU operations on headers we
/// read anyway, rather than a run of the kernel's flow dissector (bpf_get_hash_recalc).
pub const fn flow_hash(src: [u8; 4], dst: [u8; 4], protocol: u8, ports: u32) -> u32 {
    let mut h = u32::from_be_bytes(src) ^ u32::from_be_bytes(dst).rotate_left(16) ^ ports ^ protocol as u32;
    // murmur3's finaliser: every input bit moves about half the output bits.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Map an inner-flow hash into the ephemeral port range, as the kernel's vxlan device does
/// (`udp_flow_src_port`), so receivers can spread tunnel flows over queues.
pub const fn flow_src_port(hash: u32) -> u16 {
    const MIN: u32 = 32768;
    const MAX: u32 = 61000;
    // Fold the high bits in: some hashes vary mostly there.
    let hash = hash ^ (hash << 16);
    (((hash as u64 * (MAX - MIN) as u64) >> 32) as u32 + MIN) as u16
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data: repr(C), no padding beyond the explicit `_pad` fields.
    unsafe impl aya::Pod for super::Peer {}
    unsafe impl aya::Pod for super::PeerSubnet {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::LocalEndpoint {}
    unsafe impl aya::Pod for super::HostRoutingConfig {}
    unsafe impl aya::Pod for super::Peer6 {}
    unsafe impl aya::Pod for super::PeerSubnet6 {}
    unsafe impl aya::Pod for super::DatapathConfig6 {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn subnet_contains_respects_prefix() {
        let net = [10, 244, 7, 0];
        assert!(subnet_contains(net, 24, [10, 244, 7, 200]));
        assert!(!subnet_contains(net, 24, [10, 244, 8, 1]));
        assert!(subnet_contains(net, 16, [10, 244, 8, 1]));
        assert!(subnet_contains(net, 0, [1, 2, 3, 4]));
        assert!(subnet_contains(net, 32, [10, 244, 7, 0]));
        assert!(!subnet_contains(net, 32, [10, 244, 7, 1]));
        assert!(!subnet_contains(net, 33, [10, 244, 7, 0]));
    }

    #[test]
    fn subnet6_contains_respects_prefix() {
        let net = [0xfd, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut inside = net;
        inside[15] = 7;
        inside[9] = 0xff;
        let mut next = net;
        next[7] = 2;
        assert!(subnet6_contains(net, 64, inside));
        assert!(!subnet6_contains(net, 64, next));
        assert!(subnet6_contains(net, 48, next));
        assert!(subnet6_contains(net, 0, [0xff; 16]));
        assert!(subnet6_contains(net, 128, net));
        assert!(!subnet6_contains(net, 128, inside));
        assert!(!subnet6_contains(net, 129, net));
        // A prefix that ends inside a byte.
        let mut odd = net;
        odd[7] = 0x81;
        assert!(subnet6_contains(net, 56, odd));
        assert!(!subnet6_contains(net, 57, odd));
    }

    #[test]
    fn overheads_match_flannel_mtu_math() {
        // flannel: udp MTU = link MTU - 28, vxlan MTU = link MTU - 50.
        assert_eq!(Format::Udp.overhead(), 28);
        assert_eq!(Format::Vxlan.overhead(), 50);
    }

    #[test]
    fn flow_src_port_stays_in_ephemeral_range() {
        for h in [0u32, 1, 0xffff, 0x1234_5678, u32::MAX, 0x8000_0000] {
            let p = flow_src_port(h);
            assert!((32768..61000).contains(&p), "{h:#x} -> {p}");
        }
        assert_ne!(flow_src_port(1), flow_src_port(0x0001_0002));
    }

    #[test]
    fn flow_hash_separates_flows() {
        let (a, b) = ([10, 244, 1, 2], [10, 244, 2, 3]);
        let base = flow_hash(a, b, 6, 0x1234_0050);
        assert_ne!(base, flow_hash(a, b, 6, 0x1235_0050));
        assert_ne!(base, flow_hash(a, b, 17, 0x1234_0050));
        assert_ne!(base, flow_hash(b, a, 6, 0x1234_0050));
        assert_ne!(base, flow_hash(a, [10, 244, 2, 4], 6, 0x1234_0050));
        // Consecutive client ports land on different tunnel source ports.
        let ports: std::collections::BTreeSet<u16> = (0..64u32)
            .map(|p| flow_src_port(flow_hash(a, b, 6, ((40000 + p) << 16) | 80)))
            .collect();
        assert!(ports.len() >= 60, "{}", ports.len());
    }

    #[test]
    fn every_drop_reason_has_its_own_drop_counter() {
        let counters: std::collections::BTreeSet<u32> = DropReason::ALL.iter().map(|r| r.counter() as u32).collect();
        assert_eq!(counters.len(), DropReason::ALL.len(), "two reasons share a counter");
        let drops = CounterIndex::ALL
            .iter()
            .filter(|c| c.name().starts_with("drop_"))
            .count();
        assert_eq!(drops, DropReason::ALL.len(), "a drop counter no reason maps to");
        for r in DropReason::ALL {
            assert!(r.counter().name().starts_with("drop_"), "{r:?}");
        }
        assert_eq!(
            DropReason::from(accept::Refusal::SpoofedSource).counter(),
            CounterIndex::DropSpoofedSource
        );
    }

    #[test]
    fn counter_table_is_complete_and_ordered() {
        for (i, c) in CounterIndex::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
        }
    }
}
