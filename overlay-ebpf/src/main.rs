//! The tunnel datapath. Two thin entry points, one per attach point:
//! - `overlay_encap` (TC egress of the overlay device): container/host traffic to a remote
//!   subnet is wrapped in the network's tunnel format and redirected to the underlay.
//! - `overlay_decap` (XDP on the underlay) or `overlay_decap_tc` (TC ingress on the underlay),
//!   one of the two: tunnel packets from known peers are unwrapped; everything else on the
//!   tunnel port is dropped and counted; other traffic passes untouched.
//! - `overlay_bridge_out` (TC egress of the container bridge): unicast frames for a known
//!   container go straight to its port, keeping their offloads (which the bridge would drop for
//!   packets TC decapsulation let in).
//! - `overlay_from_container` (TC ingress of each container's veth) and `overlay_to_container`
//!   (TC ingress of the underlay, after decapsulation): host routing, see `host_routing.rs`.
#![no_std]
#![no_main]

mod bridge;
mod counters;
mod decap;
mod encap;
mod headers;
mod host_routing;
mod ipv6;
mod maps;
mod packet;
mod probe;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

// Each entry point runs its `try_*` and turns a drop reason into the verdict and its counter.

#[classifier]
pub fn overlay_encap(ctx: TcContext) -> i32 {
    match encap::try_encap(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            counters::count(reason.counter(), ctx.len() as u64);
            TC_ACT_SHOT as i32
        }
    }
}

#[xdp]
pub fn overlay_decap(ctx: XdpContext) -> u32 {
    match decap::try_decap_xdp(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            counters::count(reason.counter(), (ctx.data_end() - ctx.data()) as u64);
            xdp_action::XDP_DROP
        }
    }
}

#[classifier]
pub fn overlay_decap_tc(ctx: TcContext) -> i32 {
    match decap::try_decap_tc(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            counters::count(reason.counter(), ctx.len() as u64);
            TC_ACT_SHOT as i32
        }
    }
}

#[classifier]
pub fn overlay_bridge_out(ctx: TcContext) -> i32 {
    bridge::bridge_out(&ctx)
}

#[classifier]
pub fn overlay_probe_adjust_room(ctx: TcContext) -> i32 {
    probe::probe_adjust_room(&ctx)
}

#[classifier]
pub fn overlay_from_container(ctx: TcContext) -> i32 {
    match host_routing::from_container(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            counters::count(reason.counter(), ctx.len() as u64);
            TC_ACT_SHOT as i32
        }
    }
}

#[classifier]
pub fn overlay_to_container(ctx: TcContext) -> i32 {
    host_routing::to_container(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
