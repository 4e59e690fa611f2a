//! Time-bounded property runs for the fuzz targets (`tests/fuzz_*.rs`).
//!
//! Each property runs batches of generated cases until its time budget is
//! spent: `ZTXDP_FUZZ_SECONDS` (`cargo xtask test` sets 20), else
//! [`DEFAULT_SECONDS`], so a plain `cargo test` stays quick. Batch `B` of
//! seed `S` draws from a generator seeded with both; `S` is random unless
//! `ZTXDP_FUZZ_SEED` gives `S` or `S:B` (start at batch `B`), and a failure
//! prints `S:B` with the smallest failing input proptest found, so it can
//! be replayed. A run that got through fewer than [`MIN_CASES`] cases
//! fails: a fuzz step must never pass by doing nothing.

use std::{
    fmt::Debug,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use proptest::{
    strategy::Strategy,
    test_runner::{Config, RngAlgorithm, TestCaseResult, TestError, TestRng, TestRunner},
};

/// Budget of one property when `ZTXDP_FUZZ_SECONDS` is not set.
pub const DEFAULT_SECONDS: u64 = 3;
/// Fewer cases than this in a whole budget means the run tested nothing.
pub const MIN_CASES: u64 = 20;
/// Cases per batch; the clock is read between batches.
const BATCH: u32 = 16;
/// How much of a failing input a report shows.
const SHOWN: usize = 2000;

/// The time budget of one property.
///
/// # Panics
/// When `ZTXDP_FUZZ_SECONDS` is set but is not a whole number above 0: a
/// misspelt budget must not turn the run into nothing.
pub fn budget() -> Duration {
    match std::env::var("ZTXDP_FUZZ_SECONDS") {
        Err(_) => Duration::from_secs(DEFAULT_SECONDS),
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(s) if s > 0 => Duration::from_secs(s),
            _ => panic!("ZTXDP_FUZZ_SECONDS={text:?}: give whole seconds above 0"),
        },
    }
}

/// The run's seed and first batch: `ZTXDP_FUZZ_SEED`, else from the clock.
fn seed() -> (u64, u64) {
    let Ok(text) = std::env::var("ZTXDP_FUZZ_SEED") else {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() ^ u64::from(d.subsec_nanos()));
        return (now, 0);
    };
    let (seed, batch) = text.trim().split_once(':').unwrap_or((text.trim(), "0"));
    match (seed.parse(), batch.parse()) {
        (Ok(seed), Ok(batch)) => (seed, batch),
        _ => panic!("ZTXDP_FUZZ_SEED={text:?}: give SEED or SEED:BATCH, whole numbers"),
    }
}

/// Runs `test` on cases from `strategy` until the budget is spent; returns
/// how many ran.
///
/// # Panics
/// On the first failing case (after shrinking it), or when fewer than
/// [`MIN_CASES`] ran.
pub fn fuzz<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> TestCaseResult) -> u64
where
    S: Strategy,
    S::Value: Debug,
{
    let budget = budget();
    let (seed, first) = seed();
    let started = Instant::now();
    let mut cases = 0u64;
    let mut batch = first;
    while started.elapsed() < budget {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        bytes[8..16].copy_from_slice(&batch.to_le_bytes());
        let config = Config {
            cases: BATCH,
            failure_persistence: None,
            // Shrinking a big input in a debug build can take long: bounded.
            max_shrink_time: 20_000,
            ..Config::default()
        };
        // A runner counts its cases: a new one runs the next batch.
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
        match runner.run(&strategy, &test) {
            Ok(()) => cases += u64::from(BATCH),
            Err(TestError::Fail(why, input)) => {
                let mut shown = format!("{input:?}");
                if shown.len() > SHOWN {
                    let cut = (0..=SHOWN).rev().find(|&i| shown.is_char_boundary(i));
                    shown.truncate(cut.unwrap_or(0));
                    shown.push_str("...");
                }
                panic!(
                    "fuzz {name}: {why}\nsmallest failing input: {shown}\n\
                     replay with ZTXDP_FUZZ_SEED={seed}:{batch}"
                );
            }
            Err(TestError::Abort(why)) => {
                panic!("fuzz {name} aborted: {why} (ZTXDP_FUZZ_SEED={seed}:{batch})")
            }
        }
        batch += 1;
    }
    assert!(
        cases >= MIN_CASES,
        "fuzz {name}: only {cases} cases in {budget:?}; too few to mean anything"
    );
    eprintln!(
        "fuzz {name}: {cases} cases in {:.1} s, seed {seed}",
        started.elapsed().as_secs_f64()
    );
    cases
}
