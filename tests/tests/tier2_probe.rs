//! Tier 2, the kernel probe (`ztxdp::probe`): the kernel this runs on has
//! every feature `ztxdp up` checks for. `cargo xtask vmtest --full` runs
//! this on Debian's 6.1 and 6.12 too; the refusal of an older kernel is
//! unit-tested on the probe's logic. Needs root.

use zt_tests::netns::NetNs;
use ztxdp::probe;

#[test]
fn this_kernel_has_every_feature_up_needs() {
    if let Err(error) = probe::programs_and_maps() {
        panic!("{error}: {:?}", std::error::Error::source(&error));
    }
}

#[test]
fn the_attach_probe_leaves_nothing_in_the_namespace_it_runs_from() {
    let ns = NetNs::new("probe").unwrap_or_else(|e| panic!("creating a namespace (root?): {e}"));
    ns.enter(|| {
        if let Err(error) = probe::kernel() {
            panic!("{error}: {:?}", std::error::Error::source(&error));
        }
    })
    .unwrap_or_else(|e| panic!("entering {}: {e}", ns.name()));
    // The probe attached to the loopback of a namespace of its own, not to
    // this one's.
    let link = ns
        .ip(&["-d", "link", "show", "dev", "lo"])
        .unwrap_or_else(|e| panic!("ip link show lo: {e}"));
    assert!(!link.contains("xdp"), "an XDP program on lo: {link}");
    let qdiscs = ns
        .run(&["tc", "qdisc", "show", "dev", "lo"])
        .unwrap_or_else(|e| panic!("tc qdisc show dev lo: {e}"));
    assert!(!qdiscs.contains("clsact"), "a clsact qdisc on lo: {qdiscs}");
}
