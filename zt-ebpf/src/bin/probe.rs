//! Programs that do nothing, for `ztxdp up`'s kernel probe
//! (`zt-userspace/src/probe.rs`): attached in a private network namespace
//! of the probe's own, they show that this kernel can attach an XDP program
//! through netlink and a classifier to a clsact qdisc, before `up` attaches
//! anything for real.
#![no_std]
#![no_main]

#[path = "../runtime.rs"]
mod runtime;

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn zt_probe_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn zt_probe_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}
