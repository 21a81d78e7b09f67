//! Host routing (what Cilium calls eBPF host routing): container traffic between hosts that
//! skips the host's stack on both ends.
//!
//! - [`from_container`] (TC ingress of each container's host-side veth): a routed packet (sent
//!   to the bridge's MAC) from our subnet to a peer's is encapsulated with the encap program's
//!   own code, or in `Route` mode (eBPF host-gw) sent as it is, straight to the underlay: no
//!   bridge, no IP forwarding, no netfilter, no overlay device.
//! - [`to_container`] (TC ingress of the underlay, after decapsulation, XDP or TC): a packet
//!   from a peer's subnet to a container we know goes straight into the container's namespace
//!   (`bpf_redirect_peer`: no backlog, no bridge).
//!
//! Both do what a router would (MACs rewritten, TTL decremented) and hand everything else to
//! the stack untouched (TC_ACT_UNSPEC: the next program on the hook, then the stack): the
//! same host, the host itself, the outside world, broadcast, ARP, unknown containers, packets
//! whose TTL runs out or that are too large (the stack answers with the ICMP error).
use core::mem::offset_of;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, helpers::bpf_redirect_peer, maps::lpm_trie::Key, programs::TcContext};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};
use overlay_common::{CounterIndex, DropReason, HostRoutingMode, csum::ttl_decrement_checksum, subnet_contains};

use crate::{
    counters::count,
    encap::{encap_to_peer, redirect_to_peer},
    headers::ipv4_header_len,
    maps::{BRIDGE_PORTS, CONFIG, HOST_ROUTING, LOCAL_ENDPOINTS, PEERS},
    packet::{read, write},
};

/// The IPv4 header after the Ethernet header, if the frame carries one.
#[inline(always)]
fn ipv4(ctx: &TcContext) -> Option<(Ipv4Hdr, usize)> {
    let ether_type = read::<_, u16>(ctx, offset_of!(EthHdr, ether_type))?;
    if ether_type != EtherType::Ipv4 as u16 {
        return None;
    }
    let ip = read::<_, Ipv4Hdr>(ctx, EthHdr::LEN)?;
    let ihl = ipv4_header_len(&ip)?;
    Some((ip, ihl))
}

/// What a router does to a packet it forwards: one off the TTL (the checksum follows). False,
/// with nothing changed, when the header is not in the directly writable bytes.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, ip: &Ipv4Hdr) -> bool {
    let check = ttl_decrement_checksum(u16::from_be_bytes(ip.check));
    // The TTL and the checksum as one write: both or neither.
    let ttl_proto = [ip.ttl - 1, ip.proto];
    let mut bytes = [0u8; 4];
    bytes[..2].copy_from_slice(&ttl_proto);
    bytes[2..].copy_from_slice(&check.to_be_bytes());
    write(ctx, EthHdr::LEN + offset_of!(Ipv4Hdr, ttl), bytes)
}

/// Underlay ingress: a packet for a local container goes straight into its namespace.
pub fn to_container(ctx: &TcContext) -> i32 {
    let Some(hr) = HOST_ROUTING.get(0) else {
        return TC_ACT_UNSPEC;
    };
    if hr.mode() == HostRoutingMode::Off {
        return TC_ACT_UNSPEC;
    }
    let Some((ip, _)) = ipv4(ctx) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: the value is copied out at once.
    let Some(endpoint) = (unsafe { LOCAL_ENDPOINTS.get(&ip.dst_addr) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    // Overlay traffic only (decapsulated from a peer, or routed by a host-gw peer): what else
    // reaches a container from the underlay keeps the stack's rules.
    if PEERS.get(Key::new(32, ip.src_addr)).is_none() {
        return TC_ACT_UNSPEC;
    }
    // The port must still exist: the kernel removes a deleted device from this map at once,
    // before the agent's next look at the bridge.
    let Some(port) = BRIDGE_PORTS.get_ifindex(endpoint.port_ifindex) else {
        return TC_ACT_UNSPEC;
    };
    if ip.ttl <= 1 {
        return TC_ACT_UNSPEC;
    }
    let eth = EthHdr {
        dst_addr: endpoint.mac,
        src_addr: hr.bridge_mac,
        ether_type: EtherType::Ipv4 as u16,
    };
    if !decrement_ttl(ctx, &ip) || !write(ctx, 0, eth) {
        return TC_ACT_UNSPEC;
    }
    count(CounterIndex::ShortcutToContainer, ctx.len() as u64);
    // SAFETY: a helper call; an ifindex that is no veth makes it drop the packet, and the
    // devmap check above makes that a race with the port's deletion only.
    unsafe { bpf_redirect_peer(port, 0) as i32 }
}

/// A container's host-side veth, ingress: a packet for a remote subnet goes straight to the
/// underlay. Err: dropped (the reasons the encap program drops for).
pub fn from_container(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(hr) = HOST_ROUTING.get(0) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let mode = hr.mode();
    if mode == HostRoutingMode::Off {
        return Ok(TC_ACT_UNSPEC);
    }
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(TC_ACT_UNSPEC);
    };
    // Routed frames only: those a container addressed to its gateway, the bridge. Frames to
    // another container, broadcast and ARP stay on the bridge.
    let Some(dst_mac) = read::<_, [u8; 6]>(ctx, offset_of!(EthHdr, dst_addr)) else {
        return Ok(TC_ACT_UNSPEC);
    };
    if dst_mac != hr.bridge_mac {
        return Ok(TC_ACT_UNSPEC);
    }
    let Some((ip, ihl)) = ipv4(ctx) else {
        return Ok(TC_ACT_UNSPEC);
    };
    // No spoofing through the shortcut: a source outside our subnet takes the stack's path and
    // its rules (and the peer's decapsulation refuses it as before).
    if !subnet_contains(cfg.subnet_addr, cfg.subnet_prefix_len, ip.src_addr) {
        return Ok(TC_ACT_UNSPEC);
    }
    let Some(peer) = PEERS.get(Key::new(32, ip.dst_addr)) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let (peer_ip, peer_mac) = (peer.public_ip, peer.vtep_mac);
    if ip.ttl <= 1 {
        return Ok(TC_ACT_UNSPEC);
    }
    // A GSO packet is cut to the MTU later; any other one larger than the MTU goes to the
    // stack, which sends "fragmentation needed" (DF) or fragments it.
    // SAFETY: reading a field of the program's own context.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    if !gso && u32::from(ip.tot_len()) > hr.mtu {
        count(CounterIndex::ShortcutOversize, ctx.len() as u64);
        return Ok(TC_ACT_UNSPEC);
    }
    if !decrement_ttl(ctx, &ip) {
        return Ok(TC_ACT_UNSPEC);
    }
    let len = ctx.len() as u64;
    let action = match mode {
        HostRoutingMode::Encap => {
            let format = cfg.format().ok_or(DropReason::NoConfig)?;
            encap_to_peer(ctx, cfg, format, peer_ip, peer_mac, &ip, ihl)?
        }
        _ => redirect_to_peer(ctx, cfg.underlay_ifindex, cfg.public_ip, peer_ip, Some(peer_ip))?,
    };
    count(CounterIndex::ShortcutFromContainer, len);
    Ok(action)
}
