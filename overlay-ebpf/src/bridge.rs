//! Egress of the container bridge (docker0, cni0): hand frames for a container straight to its
//! port, doing the bridge's forwarding-database lookup ourselves with the agent's copy of it.
//!
//! Why: after TC decapsulation the skb still says it carries a UDP tunnel (skb->encapsulation,
//! SKB_GSO_UDP_TUNNEL); only BPF_F_ADJ_ROOM_DECAP_L4_UDP, which kernels up to 6.18 lack, would
//! clear that. A bridge device offers no offloads for encapsulated packets, so before the bridge
//! forwards one the kernel checksums it in software, and segments it if it is a 64 KB GSO
//! packet: the container's TCP then receives MSS-sized segments. A veth port offers those
//! offloads. That flag is not in `__sk_buff` (reading the kernel's skb takes a kfunc and CO-RE
//! relocations, which aya-ebpf lacks), and no tag survives from the underlay's ingress to here
//! (forwarding clears tc_index; skb->mark belongs to iptables users), so every unicast frame to a
//! known container takes this path; for the others it only saves the bridge's own work.
//!
//! When we run, routing, netfilter (FORWARD, POSTROUTING) and the neighbour lookup are done; only
//! the bridge's forwarding is replaced (so `tcpdump -i docker0` no longer shows these frames; the
//! container's veth does). Broadcast, multicast, MACs we do not know and ports that are gone go on
//! to the bridge as before. "Before" is TC_ACT_UNSPEC: programs and filters after ours on this
//! hook still run (TC_ACT_OK would end the hook's chain).
use core::mem::offset_of;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, helpers::bpf_redirect, programs::TcContext};
use network_types::eth::EthHdr;
use overlay_common::CounterIndex;

use crate::{
    counters::count,
    maps::{BRIDGE_FDB, BRIDGE_PORTS},
    packet::read,
};

/// Never drops: a frame we do not hand to a port goes on to the bridge.
pub fn bridge_out(ctx: &TcContext) -> i32 {
    // Only the destination MAC: copying the whole header costs instructions on every frame.
    let Some(dst) = read::<_, [u8; 6]>(ctx, offset_of!(EthHdr, dst_addr)) else {
        return TC_ACT_UNSPEC;
    };
    // Broadcast and multicast: the group bit of the first byte.
    if dst[0] & 1 != 0 {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: the value is copied out at once.
    let port = unsafe { BRIDGE_FDB.get(&dst) }.copied();
    match port.and_then(|ifindex| BRIDGE_PORTS.get_ifindex(ifindex)) {
        Some(ifindex) => {
            count(CounterIndex::BridgeRedirect, ctx.len() as u64);
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        None => {
            count(CounterIndex::BridgeUnknownPort, ctx.len() as u64);
            TC_ACT_UNSPEC
        }
    }
}
