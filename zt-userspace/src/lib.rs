//! ztxdp: a zero-trust packet authorization layer on XDP and TC.
//!
//! The binary (`src/main.rs`) is a thin clap front end over this library.

pub mod adopt;
pub mod attach;
pub mod audit;
pub mod build_info;
pub mod config;
pub mod confirm;
pub mod control;
pub mod daemon;
pub mod docs;
pub mod drift;
pub mod explain;
pub mod export;
pub mod grants;
pub mod identity;
pub mod import_wg;
pub mod loader;
pub mod lockout;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod policy;
pub mod probe;
pub mod reload;
pub mod report;
pub mod tables;

/// The compiled BPF object holding `zt_edge` and `zt_tunnel`.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zt-ebpf"));

/// The benchmark helpers `zt_bench_tx` (live-frames traffic generator) and
/// `zt_bench_drop` (bare `XDP_DROP`), used only by `cargo xtask bench`.
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench"));

/// `zt_probe_xdp` and `zt_probe_tc`, programs that do nothing: the kernel
/// probe (`probe`) attaches them in a private network namespace.
pub static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe"));

#[cfg(test)]
mod tests {
    use zt_common::reason;

    /// The README's reason table lists every reason of zt-common's one
    /// list, with its code, name, verdict and meaning, in order.
    #[test]
    fn the_readme_reason_table_is_the_one_in_zt_common() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
        let rows: Vec<&str> = readme
            .lines()
            .skip_while(|l| *l != "| code | reason | verdict | when |")
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .collect();
        let want: Vec<String> = reason::ALL
            .iter()
            .map(|&code| {
                format!(
                    "| {code} | `{}` | {} | {} |",
                    reason::name(code),
                    reason::class(code),
                    reason::meaning(code)
                )
            })
            .collect();
        assert_eq!(
            rows, want,
            "regenerate the README table from zt-common's reasons! list"
        );
    }
}
