//! The probe's logic, fed the answers of a kernel it does not run on; the
//! real kernel's answers are tier 2's (`tests/tests/tier2_probe.rs`).
use std::collections::BTreeSet;

use aya_obj::generated::{BPF_CALL, BPF_JMP};

use super::*;

/// The features a kernel of `release` lacks, by when they came: a 5.10
/// kernel lacks what came in 5.11 and 5.14.
fn kernel_without(newer_than: &[&str]) -> impl FnMut(Feature) -> Result<bool, Source> {
    move |feature| Ok(!newer_than.contains(&feature.since()))
}

#[test]
fn an_old_kernel_is_refused_with_every_missing_feature_named() {
    let Err(error) = evaluate(
        "5.10.0-30-amd64",
        &load_features(),
        kernel_without(&["5.11", "5.14"]),
    ) else {
        panic!("a 5.10 kernel passed the probe");
    };
    let ProbeError::Unsupported { missing, .. } = &error else {
        panic!("expected Unsupported, got {error:?}");
    };
    let coarse = HELPERS
        .iter()
        .find(|h| h.name == "bpf_ktime_get_coarse_ns")
        .unwrap_or_else(|| panic!("bpf_ktime_get_coarse_ns is not in HELPERS"));
    assert_eq!(
        missing,
        &[
            Feature::LookupAndDelete,
            Feature::Helper(coarse, Hook::Xdp),
            Feature::Helper(coarse, Hook::Tc),
        ]
    );
    let message = error.to_string();
    for part in [
        "this kernel (5.10.0-30-amd64) lacks",
        "BPF_MAP_LOOKUP_AND_DELETE_ELEM on LRU hash maps (Linux 5.14)",
        "the helper bpf_ktime_get_coarse_ns in XDP programs (Linux 5.11)",
        "the helper bpf_ktime_get_coarse_ns in tc programs (Linux 5.11)",
        "ztxdp needs Linux 5.14 or newer",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

#[test]
fn a_kernel_with_every_feature_passes() {
    let result = evaluate("6.1.0-57-amd64", &load_features(), kernel_without(&[]));
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn a_check_that_fails_stops_the_probe_and_names_its_feature() {
    let mut checked = Vec::new();
    let result = evaluate("6.18.0", &load_features(), |feature| {
        checked.push(feature);
        if feature == Feature::RingBuffer {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM).into());
        }
        Ok(true)
    });
    let Err(ProbeError::Check {
        feature, source, ..
    }) = result
    else {
        panic!("expected a Check error, got {result:?}");
    };
    assert_eq!(feature, Feature::RingBuffer);
    assert!(source.to_string().contains("memory"), "{source}");
    assert_eq!(
        checked.last(),
        Some(&Feature::RingBuffer),
        "the probe went on after a failed check"
    );
}

#[test]
fn a_check_refused_for_lack_of_privileges_is_no_verdict_on_the_kernel() {
    let result = evaluate("6.18.0", &load_features(), |_| {
        Err(io::Error::from_raw_os_error(libc::EPERM).into())
    });
    let Err(error @ ProbeError::Refused { .. }) = result else {
        panic!("expected Refused, got {result:?}");
    };
    let message = error.to_string();
    assert!(
        message.starts_with("the kernel refused") && !message.contains("needs Linux"),
        "{message}"
    );
}

#[test]
fn lookup_and_delete_refused_by_the_kernel_is_a_missing_feature() {
    let refused = |errno| lookup_and_delete_outcome(Err(io::Error::from_raw_os_error(errno)));
    // What 5.10's map_lookup_and_delete_elem answers for a hash map.
    assert!(matches!(refused(ENOTSUPP), Ok(false)));
    assert!(matches!(refused(libc::EINVAL), Ok(false)));
    assert!(
        refused(libc::EPERM).is_err(),
        "no privileges is no answer about the kernel"
    );
    assert!(matches!(
        lookup_and_delete_outcome(Ok(Some(FlowSummary::default()))),
        Ok(true)
    ));
    assert!(
        lookup_and_delete_outcome(Ok(None)).is_err(),
        "the element was just inserted"
    );
}

#[test]
fn every_helper_the_programs_call_is_probed() {
    let object = aya_obj::Object::parse(crate::BPF_OBJECT)
        .unwrap_or_else(|e| panic!("parsing the BPF object: {e}"));
    let call = u8::try_from(BPF_JMP | BPF_CALL).unwrap_or_else(|e| panic!("{e}"));
    // src_reg 0: a helper; 1 is a call of a BPF function, 2 of a kfunc.
    let called: BTreeSet<i32> = object
        .functions
        .values()
        .flat_map(|f| &f.instructions)
        .filter(|insn| insn.code == call && insn.src_reg() == 0)
        .map(|insn| insn.imm)
        .collect();
    let probed: BTreeSet<i32> = HELPERS
        .iter()
        .map(|h| i32::try_from(h.id as u32).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert_eq!(
        called, probed,
        "the helpers the object calls (left) and the ones the probe checks (right) differ; \
         update probe::HELPERS"
    );
}
