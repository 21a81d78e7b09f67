//! Ingress (XDP on the underlay): unwrap tunnel packets from known peers.
//!
//! Decision order, and why: a packet is ours to judge only once we have seen that it is UDP to
//! our tunnel port and addressed to our PublicIP; anything we cannot classify that far passes
//! untouched (a truncated frame, a non-first fragment). From there on, every packet is either
//! decapsulated or dropped with a counted reason.
use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, udp::UdpHdr};
use overlay_common::{
    CounterIndex, Format, subnet_contains,
    wire::{ETH_LEN, ETH_P_IP, IPPROTO_UDP, IPV4_MF, IPV4_OFFSET_MASK, UDP_LEN, VXLAN_LEN},
};

use crate::{
    counters::count,
    maps::{CONFIG, PEERS_BY_IP},
    packet::ptr_at,
};

const PASS: Result<u32, CounterIndex> = Ok(xdp_action::XDP_PASS);

pub fn decap(ctx: &XdpContext) -> Result<u32, CounterIndex> {
    let Some(cfg) = CONFIG.get(0) else {
        return PASS;
    };
    let Some(format) = cfg.format() else {
        return PASS;
    };

    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return PASS;
    };
    let eth = unsafe { *eth };
    if u16::from_be(eth.ether_type) != ETH_P_IP {
        return PASS;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN as usize) else {
        return PASS;
    };
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize * 4;
    if ip.vihl >> 4 != 4 || ihl < 20 || ip.proto as u8 != IPPROTO_UDP {
        return PASS;
    }
    let frags = u16::from_be_bytes(ip.frags);
    if frags & IPV4_OFFSET_MASK != 0 {
        // No UDP header in a non-first fragment: we cannot tell whose it is.
        return PASS;
    }
    let udp_off = ETH_LEN as usize + ihl;
    let Some(udp) = ptr_at::<UdpHdr>(ctx, udp_off) else {
        return PASS;
    };
    let udp = unsafe { &*udp };
    if u16::from_be_bytes(udp.dst) != cfg.port || ip.dst_addr != cfg.public_ip {
        return PASS;
    }

    // Tunnel traffic for us from here on.
    if frags & IPV4_MF != 0 {
        return Err(CounterIndex::DropFragment);
    }
    // SAFETY: the value is copied out at once; a concurrent update can only give us an old or
    // a new entry, both valid.
    let peer = unsafe { PEERS_BY_IP.get(&ip.src_addr) }.ok_or(CounterIndex::DropUnknownPeer)?;
    let (peer_net, peer_len) = (peer.addr, peer.prefix_len);

    let mut inner_off = udp_off + UDP_LEN as usize;
    if format == Format::Vxlan {
        let vx = ptr_at::<[u8; 8]>(ctx, inner_off).ok_or(CounterIndex::DropMalformed)?;
        let vni = overlay_common::wire::vxlan_vni(unsafe { &*vx });
        if vni != Some(cfg.vni & 0x00ff_ffff) {
            return Err(CounterIndex::DropWrongVni);
        }
        let inner_eth = ptr_at::<EthHdr>(ctx, inner_off + VXLAN_LEN as usize).ok_or(CounterIndex::DropMalformed)?;
        if u16::from_be(unsafe { (*inner_eth).ether_type }) != ETH_P_IP {
            return Err(CounterIndex::DropMalformed);
        }
        inner_off += (VXLAN_LEN + ETH_LEN) as usize;
    }

    let inner = ptr_at::<Ipv4Hdr>(ctx, inner_off).ok_or(CounterIndex::DropMalformed)?;
    let inner = unsafe { &*inner };
    let inner_len = u16::from_be_bytes(inner.tot_len) as usize;
    if inner.vihl >> 4 != 4
        || inner.vihl & 0x0f < 5
        || inner_len < (inner.vihl & 0x0f) as usize * 4
        || inner_off + inner_len > ctx.data_end() - ctx.data()
    {
        return Err(CounterIndex::DropMalformed);
    }
    if !subnet_contains(peer_net, peer_len, inner.src_addr) {
        return Err(CounterIndex::DropSpoofedSource);
    }
    if !subnet_contains(cfg.subnet_addr, cfg.subnet_prefix_len, inner.dst_addr) {
        return Err(CounterIndex::DropNotOurSubnet);
    }

    // Strip everything between the outer Ethernet header and the inner IPv4 packet, then put
    // the outer Ethernet header (addressed to this NIC) back in front: the stack then routes
    // the inner packet as if it had arrived directly.
    let strip = (inner_off - ETH_LEN as usize) as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip) } != 0 {
        return Err(CounterIndex::DropDecapFailed);
    }
    // Packet pointers are stale after adjust_head: re-check before writing.
    let new_eth = ptr_at::<EthHdr>(ctx, 0).ok_or(CounterIndex::DropDecapFailed)?;
    unsafe {
        (*new_eth).dst_addr = eth.dst_addr;
        (*new_eth).src_addr = eth.src_addr;
        (*new_eth).ether_type = ETH_P_IP.to_be();
    }
    count(CounterIndex::decap(format), inner_len as u64);
    Ok(xdp_action::XDP_PASS)
}
