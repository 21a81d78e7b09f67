//! Egress: wrap an IPv4 packet routed to the overlay device in the network's tunnel format
//! and send it out of the underlay towards the peer that owns the destination subnet.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_get_hash_recalc, bpf_redirect, bpf_redirect_neigh, bpf_skb_store_bytes,
    },
    maps::lpm_trie::Key,
    programs::TcContext,
};
use overlay_common::{
    CounterIndex, Format, flow_src_port,
    wire::{ETH_LEN, ETH_P_IP, Encap},
};

use crate::{
    counters::count,
    maps::{CONFIG, PEERS},
};

const AF_INET: u8 = 2;

pub fn encap(ctx: &TcContext) -> Result<i32, CounterIndex> {
    let cfg = CONFIG.get(0).ok_or(CounterIndex::DropNoConfig)?;
    let format = cfg.format().ok_or(CounterIndex::DropNoConfig)?;

    let proto: [u8; 2] = ctx.load(12).map_err(|_| CounterIndex::DropNotIpv4)?;
    if u16::from_be_bytes(proto) != ETH_P_IP {
        return Err(CounterIndex::DropNotIpv4);
    }
    let vihl: u8 = ctx.load(ETH_LEN as usize).map_err(|_| CounterIndex::DropNotIpv4)?;
    let dst: [u8; 4] = ctx.load(ETH_LEN as usize + 16).map_err(|_| CounterIndex::DropNotIpv4)?;
    if vihl >> 4 != 4 || vihl & 0x0f < 5 {
        return Err(CounterIndex::DropNotIpv4);
    }

    let peer = PEERS.get(Key::new(32, dst)).ok_or(CounterIndex::DropNoPeer)?;
    let peer_ip = peer.public_ip;
    let peer_mac = peer.vtep_mac;

    let inner_len = ctx.len() - ETH_LEN;
    // Hash of the inner flow, taken before the headers change; spreads tunnel flows on the
    // receiver as the kernel's vxlan device does.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };

    // The encap flags keep GSO working: the kernel segments the inner TCP stream and
    // replicates our outer headers per segment. FIXED_GSO keeps the MSS: the overlay MTU
    // already leaves room for these headers.
    //
    // The inner L4 checksum stays as the sender left it (often CHECKSUM_PARTIAL, finished by
    // the NIC or at segmentation). We do not finish it here: no helper clears
    // CHECKSUM_PARTIAL, and a finished value in a skb still marked partial is summed again
    // by whoever finishes it (NIC offload, skb_checksum_help) and comes out wrong. Over a
    // bare veth nobody finishes it, which only a userspace receiver (flannel's udp backend)
    // notices; turning tx checksum offload off on that veth fixes it.
    let mut flags = (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP) as u64;
    if format == Format::Vxlan {
        flags |= BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64 | aya_ebpf::bpf_f_adj_room_encap_l2(ETH_LEN as u64);
    }
    ctx.adjust_room(format.overhead() as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| CounterIndex::DropEncapFailed)?;

    let headers = Encap {
        src_ip: cfg.public_ip,
        dst_ip: peer_ip,
        src_port: flow_src_port(hash),
        dst_port: cfg.port,
        vni: cfg.vni,
        inner_src_mac: cfg.vtep_mac,
        inner_dst_mac: peer_mac,
    }
    .headers(format, inner_len);
    let hp = &headers as *const _ as *const core::ffi::c_void;
    // Two calls with constant lengths: the helper's length must be known to the verifier.
    let rc = unsafe {
        match format {
            Format::Udp => bpf_skb_store_bytes(ctx.skb.skb, ETH_LEN, hp, 28, 0),
            Format::Vxlan => bpf_skb_store_bytes(ctx.skb.skb, ETH_LEN, hp, 50, 0),
        }
    };
    if rc != 0 {
        return Err(CounterIndex::DropEncapFailed);
    }

    let action = redirect_to_peer(ctx, cfg.underlay_ifindex, cfg.public_ip, peer_ip)?;
    count(CounterIndex::encap(format), inner_len as u64);
    Ok(action)
}

/// Route the outer packet: the fib lookup gives next hop and MACs when the neighbour is known
/// (the common case); otherwise the kernel resolves it (`bpf_redirect_neigh`), so peers behind
/// a gateway and cold neighbour caches both work.
fn redirect_to_peer(ctx: &TcContext, ifindex: u32, src: [u8; 4], dst: [u8; 4]) -> Result<i32, CounterIndex> {
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // tot_len stays 0: no MTU check here, GSO packets are segmented after us.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let mut eth = [0u8; 14];
        eth[0..6].copy_from_slice(&p.dmac);
        eth[6..12].copy_from_slice(&p.smac);
        eth[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        ctx.store(0, &eth, 0).map_err(|_| CounterIndex::DropEncapFailed)?;
        return Ok(unsafe { bpf_redirect(p.ifindex, 0) } as i32);
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Ok(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32);
    }
    Err(CounterIndex::DropNoRoute)
}
