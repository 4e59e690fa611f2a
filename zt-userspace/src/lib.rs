//! ztxdp: a zero-trust packet authorization layer on XDP and TC.
//!
//! The binary (`src/main.rs`) is a thin clap front end over this library.

pub mod adopt;
pub mod attach;
pub mod audit;
pub mod config;
pub mod control;
pub mod daemon;
pub mod export;
pub mod grants;
pub mod identity;
pub mod import_wg;
pub mod loader;
pub mod lockout;
pub mod model;
pub mod policy;
pub mod reload;
pub mod report;
pub mod tables;

/// The compiled BPF object holding `zt_edge` and `zt_tunnel`.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zt-ebpf"));

/// The benchmark helpers `zt_bench_tx` (live-frames traffic generator) and
/// `zt_bench_drop` (bare `XDP_DROP`), used only by `cargo xtask bench`.
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench"));
