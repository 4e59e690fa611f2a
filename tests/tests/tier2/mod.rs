//! Shared by the tier-2 test crates (`mod tier2;`): runs frames through
//! the loaded programs with `BPF_PROG_TEST_RUN` (needs root; nothing is
//! attached to any interface).
//!
//! Every run is checked the same way: exactly one verdict counter of the
//! program must move, by exactly one, and the program's return value must
//! be the pass or drop action that reason implies. So a test that expects a
//! reason also proves the packet was counted once and acted on accordingly.
//!
//! What the programs see (kernel 6.18, `net/bpf/test_run.c`):
//! - XDP: the bytes as given. Inputs shorter than 14 bytes are refused with
//!   `EINVAL`, and so are inputs whose part after the XDP metadata (which
//!   `ctx_in` can declare) is shorter: frames of 0 to 13 bytes cannot be run.
//! - TC (`SCHED_CLS`): the kernel runs `eth_type_trans` over the first 14
//!   bytes (so inputs shorter than 14 bytes are refused with `EINVAL`) and
//!   then pushes those 14 bytes back, because `SCHED_CLS` is an L2 program
//!   type; `data` therefore starts at byte 0 of the input whatever the
//!   device. For `tunnel_l2 = false` the input is simply the bare IP packet:
//!   its first 14 bytes are misread as an Ethernet header by the kernel,
//!   which only sets `skb->protocol` from them, and the program then parses
//!   the same bytes as IP, as it would on a `WireGuard` device.
//! - TC, also: when bytes 12..14 read as the IPv4 or IPv6 `EtherType`, the
//!   kernel refuses (`EINVAL`) inputs shorter than 14 bytes plus a minimal
//!   IPv4 (20) or IPv6 (40) header. Truncated IP headers therefore reach
//!   the L2 tunnel program only behind a VLAN tag, and an L3 packet is
//!   refused when its own bytes 12..14 happen to be 0x0800 or 0x86dd.

// Each test crate that includes this module uses a different part of it.
#![allow(dead_code, reason = "shared by several test crates")]

use std::{
    collections::BTreeMap,
    sync::{LazyLock, Mutex, MutexGuard, PoisonError},
};

use aya::{
    Ebpf, TestRun, TestRunOptions, TestRunResult,
    programs::{Program, ProgramError, SchedClassifier, Xdp},
};
use zt_common::{FragmentKey, map, program, reason};
use zt_tests::packet::hex_dump;
use ztxdp::{
    loader,
    policy::{EdgePolicy, FlowSettings, Grant, Peer, Protocol, TunnelPolicy},
    tables::Tables,
};

/// `XDP_DROP` and `XDP_PASS`; `XDP_ABORTED` (0) must never come back.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
/// `TC_ACT_OK` and `TC_ACT_SHOT`.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

/// The result of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// The program's return value.
    pub action: u32,
    /// The one verdict counter that moved.
    pub reason: u32,
    /// The would-drop counter moved with it: the policy dropped the packet
    /// (`reason`), and it passed in audit mode.
    pub would_drop: bool,
}

/// The programs, loaded and configured, with their maps.
pub struct Programs {
    pub ebpf: Ebpf,
    pub tables: Tables,
    /// Each program's verdict counters after its last run through this
    /// struct: the next run's "before", which halves the map reads of a
    /// long differential run. Only runs through [`Self::edge`] and
    /// [`Self::tunnel`] move these counters in a test, so it stays exact; a
    /// run that bypassed them would show up as a counter mismatch, not
    /// pass unnoticed.
    after_last_run: BTreeMap<u32, BTreeMap<u32, u64>>,
}

impl Programs {
    /// Loads the programs and writes the given policies, with the default
    /// flow settings, as the daemon does.
    ///
    /// # Panics
    /// When loading or configuring fails (not root, verifier rejection).
    #[must_use]
    pub fn load(tunnel_l2: bool, edge: Option<&EdgePolicy>, tunnel: Option<&TunnelPolicy>) -> Self {
        Self::load_with_flows(tunnel_l2, edge, tunnel, &FlowSettings::default())
    }

    /// As [`Self::load`], with the given flow timeouts. The echo rate is the
    /// edge policy's.
    ///
    /// # Panics
    /// As [`Self::load`].
    #[must_use]
    pub fn load_with_flows(
        tunnel_l2: bool,
        edge: Option<&EdgePolicy>,
        tunnel: Option<&TunnelPolicy>,
        flows: &FlowSettings,
    ) -> Self {
        let (ebpf, tables) =
            loader::load_filled(tunnel_l2, edge, tunnel, flows).unwrap_or_else(|e| {
                panic!("loading and filling the BPF programs (tests must run as root): {e:?}")
            });
        Self {
            ebpf,
            tables,
            after_last_run: BTreeMap::new(),
        }
    }

    /// Runs an egress flow recorder (`zt_edge_out` or `zt_tunnel_out`) on
    /// an outgoing packet and returns whether it created a flow. Egress is
    /// never filtered, so anything but `TC_ACT_OK` is a failure.
    ///
    /// # Panics
    /// When the run fails or the program does not return `TC_ACT_OK`.
    pub fn egress(&mut self, name: &'static str, packet: &[u8]) -> bool {
        let before = self.counter(program::EGRESS, reason::FLOWS_CREATED);
        let action = test_run::<SchedClassifier>(&mut self.ebpf, name, packet, None)
            .unwrap_or_else(|e| panic!("{name}: test run refused: {e:?}\n{}", hex_dump(packet)));
        assert_eq!(
            action,
            TC_ACT_OK,
            "{name} must never drop\n{}",
            hex_dump(packet)
        );
        self.counter(program::EGRESS, reason::FLOWS_CREATED) > before
    }

    /// Empties the fragment table (`ZT_FRAGS`), so that the next packet meets
    /// a program that has let no first fragment through, as the stateless
    /// models assume.
    ///
    /// # Panics
    /// When the map cannot be read or an entry cannot be deleted.
    pub fn forget_fragments(&mut self) {
        let m = self
            .ebpf
            .map_mut(map::FRAGMENTS)
            .unwrap_or_else(|| panic!("no map {}", map::FRAGMENTS));
        let mut t = aya::maps::HashMap::<_, FragmentKey, u64>::try_from(m)
            .unwrap_or_else(|e| panic!("{}: {e:?}", map::FRAGMENTS));
        let keys: Vec<FragmentKey> = t
            .keys()
            .map(|k| k.unwrap_or_else(|e| panic!("{}: {e:?}", map::FRAGMENTS)))
            .collect();
        for k in &keys {
            t.remove(k)
                .unwrap_or_else(|e| panic!("{}: {e:?}", map::FRAGMENTS));
        }
    }

    /// Forgets the counters seen after the last run, for a test that
    /// changed them outside a run (adoption copies counts in).
    pub fn recount(&mut self) {
        self.after_last_run.clear();
    }

    /// Counter `code` of program `prog`, summed over CPUs: verdict and
    /// bookkeeping counters alike.
    ///
    /// # Panics
    /// When the counter map cannot be read.
    #[must_use]
    pub fn counter(&self, prog: u32, code: u32) -> u64 {
        self.tables
            .counters(prog)
            .unwrap_or_else(|e| panic!("reading the counters: {e:?}"))
            .get(&code)
            .copied()
            .unwrap_or(0)
    }

    /// Runs `zt_edge` on `frame`.
    ///
    /// # Errors
    /// When the kernel refuses the run (e.g. an input it cannot build a
    /// context from); the counters are then checked not to have moved.
    ///
    /// # Panics
    /// When the counters or the action are inconsistent (see the module docs).
    pub fn edge(&mut self, frame: &[u8]) -> Result<Run, ProgramError> {
        let before = self.counters_before(program::EDGE);
        let result = test_run::<Xdp>(&mut self.ebpf, program::EDGE_NAME, frame, None);
        self.finish(program::EDGE, &before, result, frame)
    }

    /// Runs `zt_tunnel` on `packet` (an Ethernet frame or a bare IP packet,
    /// as the programs were loaded).
    ///
    /// # Errors
    /// As [`Self::edge`].
    ///
    /// # Panics
    /// As [`Self::edge`].
    pub fn tunnel(&mut self, packet: &[u8]) -> Result<Run, ProgramError> {
        let before = self.counters_before(program::TUNNEL);
        let result =
            test_run::<SchedClassifier>(&mut self.ebpf, program::TUNNEL_NAME, packet, None);
        self.finish(program::TUNNEL, &before, result, packet)
    }

    /// As [`Self::tunnel`], with the packet received on device `ifindex` of
    /// the calling thread's namespace instead of its loopback (ifindex 1),
    /// where every other run is.
    ///
    /// # Errors
    /// As [`Self::edge`]; `ENODEV` if the namespace has no such device.
    ///
    /// # Panics
    /// As [`Self::edge`].
    pub fn tunnel_on(&mut self, ifindex: u32, packet: &[u8]) -> Result<Run, ProgramError> {
        let before = self.counters_before(program::TUNNEL);
        let ctx = skb_on(ifindex);
        let result =
            test_run::<SchedClassifier>(&mut self.ebpf, program::TUNNEL_NAME, packet, Some(&ctx));
        self.finish(program::TUNNEL, &before, result, packet)
    }

    fn counters_before(&mut self, prog: u32) -> BTreeMap<u32, u64> {
        self.after_last_run
            .remove(&prog)
            .unwrap_or_else(|| self.counters(prog))
    }

    /// Verdict counters of one program, summed over CPUs.
    ///
    /// # Panics
    /// When the counter map cannot be read.
    #[must_use]
    pub fn counters(&self, prog: u32) -> BTreeMap<u32, u64> {
        let mut c = self
            .tables
            .counters(prog)
            .unwrap_or_else(|e| panic!("reading the counters: {e:?}"));
        // Audit bookkeeping moves with the ring buffer's fill level, not with
        // the verdict; only verdict counters identify the reason, and the
        // would-drop counter what audit mode made of it.
        c.retain(|code, _| reason::ALL.contains(code) || *code == reason::WOULD_DROP);
        c
    }

    fn finish(
        &mut self,
        prog: u32,
        before: &BTreeMap<u32, u64>,
        result: Result<u32, ProgramError>,
        input: &[u8],
    ) -> Result<Run, ProgramError> {
        let after = self.counters(prog);
        let moved: Vec<(u32, u64)> = after
            .iter()
            .filter_map(|(code, n)| {
                let delta = n - before.get(code).copied().unwrap_or(0);
                (delta != 0).then_some((*code, delta))
            })
            .collect();
        self.after_last_run.insert(prog, after);
        let action = match result {
            Ok(a) => a,
            Err(e) => {
                assert!(
                    moved.is_empty(),
                    "refused run still moved counters {moved:?}"
                );
                return Err(e);
            }
        };
        let would_drop = moved.contains(&(reason::WOULD_DROP, 1));
        let moved: Vec<(u32, u64)> = moved
            .into_iter()
            .filter(|(code, _)| *code != reason::WOULD_DROP)
            .collect();
        let [(code, 1)] = moved[..] else {
            panic!(
                "program {prog}: expected exactly one verdict counter to move by one, got {:?}\n{}",
                moved
                    .iter()
                    .map(|(c, n)| (reason::name(*c), *n))
                    .collect::<Vec<_>>(),
                hex_dump(input)
            );
        };
        let (pass, drop) = if prog == program::EDGE {
            (XDP_PASS, XDP_DROP)
        } else {
            (TC_ACT_OK, TC_ACT_SHOT)
        };
        assert!(
            !(would_drop && reason::is_allow(code)),
            "program {prog}: a would-drop of passing reason {}\n{}",
            reason::name(code),
            hex_dump(input)
        );
        let want = if reason::is_allow(code) || would_drop {
            pass
        } else {
            drop
        };
        assert_eq!(
            action,
            want,
            "program {prog}: reason {} (would-drop: {would_drop}) but action {action}\n{}",
            reason::name(code),
            hex_dump(input)
        );
        Ok(Run {
            action,
            reason: code,
            would_drop,
        })
    }
}

/// One `BPF_PROG_TEST_RUN` of the program `name` on `input`; its return
/// value.
///
/// # Panics
/// When the object has no program `name` of type `P`.
fn test_run<P>(
    ebpf: &mut Ebpf,
    name: &'static str,
    input: &[u8],
    ctx: Option<&[u8]>,
) -> Result<u32, ProgramError>
where
    for<'a> &'a mut P: TryFrom<&'a mut Program>,
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let prog: &mut P =
        loader::program_mut(ebpf, name).unwrap_or_else(|e| panic!("program {name}: {e:?}"));
    prog.test_run(TestRunOptions {
        data_in: Some(input),
        ctx_in: ctx,
        ..Default::default()
    })
    .map(|r| r.return_value)
}

/// The start of a `struct __sk_buff` (`linux/bpf.h`) up to and including
/// `ifindex`, with only `ifindex` set. The kernel takes a shorter context
/// as zeros at the end, refuses one that sets fields it does not accept
/// from user space, and runs the program with the skb on device `ifindex`
/// when it is above 1.
fn skb_on(ifindex: u32) -> [u8; 44] {
    /// `offsetof(struct __sk_buff, ifindex)`: ten `__u32` fields before it.
    const IFINDEX: usize = 40;
    let mut ctx = [0; 44];
    ctx[IFINDEX..].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// The interface every program sees under `BPF_PROG_TEST_RUN`: the
/// kernel runs both XDP and TC test packets on the namespace's loopback,
/// so egress and both ingress programs share one interface here.
pub const TEST_RUN_IFINDEX: u32 = 1;

/// `CLOCK_MONOTONIC`, the programs' clock, read from user space.
///
/// # Panics
/// When the clock cannot be read.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec that we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    assert_eq!(
        rc,
        0,
        "clock_gettime(CLOCK_MONOTONIC): {}",
        std::io::Error::last_os_error()
    );
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// A program shared by the tests of one crate. Loading once keeps the
/// crate fast; the mutex serialises the tests so that counter deltas are
/// exact.
pub type Shared = LazyLock<Mutex<Programs>>;

/// Locks a [`Shared`]. A test that panicked while holding it left the
/// programs consistent (every check is a delta), so poisoning is ignored.
pub fn lock(shared: &'static Shared) -> MutexGuard<'static, Programs> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One named input and the reason it must produce.
pub struct Case {
    pub name: String,
    pub input: Vec<u8>,
    pub want: u32,
}

impl Case {
    pub fn new(name: impl Into<String>, input: Vec<u8>, want: u32) -> Self {
        Self {
            name: name.into(),
            input,
            want,
        }
    }
}

/// Which program a table of cases goes through.
#[derive(Clone, Copy, Debug)]
pub enum Prog {
    Edge,
    Tunnel,
}

impl Programs {
    /// Runs one input through `prog`, panicking if the kernel refuses it.
    ///
    /// # Panics
    /// When the run fails or is inconsistent.
    pub fn run(&mut self, prog: Prog, input: &[u8]) -> Run {
        let r = match prog {
            Prog::Edge => self.edge(input),
            Prog::Tunnel => self.tunnel(input),
        };
        r.unwrap_or_else(|e| panic!("{prog:?}: test run refused: {e:?}\n{}", hex_dump(input)))
    }

    /// Runs every case and panics listing all the ones that got another
    /// reason, so one failure does not hide the rest. Cases are
    /// independent: a first fragment a case lets through is forgotten after
    /// it, so no later case's fragment follows it. How later fragments
    /// follow a first is `tier2_flows`' to test, against the stateful model.
    ///
    /// # Panics
    /// When a case fails.
    pub fn expect_all(&mut self, prog: Prog, cases: &[Case]) {
        assert!(!cases.is_empty(), "no cases");
        let mut failures = Vec::new();
        for c in cases {
            let got = self.run(prog, &c.input).reason;
            if reason::is_allow(got) {
                self.forget_fragments();
            }
            if got != c.want {
                failures.push(format!(
                    "{}: want {}, got {}\n{}",
                    c.name,
                    reason::name(c.want),
                    reason::name(got),
                    hex_dump(&c.input)
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{prog:?}: {} of {} cases failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }
}

/// A port-range grant.
pub const fn ports(protocol: Protocol, first: u16, last: u16) -> Grant {
    Grant::Ports {
        protocol,
        first,
        last,
    }
}

/// A tunnel peer without a public key; `addresses` are prefixes.
///
/// # Panics
/// When an address is not a prefix.
pub fn peer(name: &str, addresses: &[&str], grants: Vec<Grant>) -> Peer {
    Peer {
        name: name.into(),
        addresses: addresses
            .iter()
            .map(|s| s.parse().unwrap_or_else(|e| panic!("prefix {s}: {e}")))
            .collect(),
        public_key: None,
        grants,
        mode: ztxdp::policy::Mode::Enforce,
    }
}

/// `name` from the environment, decimal or `0x` hex (as failures print
/// seeds), else `default`.
///
/// # Panics
/// When `name` is set but not such a number.
pub fn env_seed(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |s| {
        let s = s.trim();
        s.strip_prefix("0x")
            .map_or_else(|| s.parse(), |h| u64::from_str_radix(h, 16))
            .unwrap_or_else(|e| panic!("{name}={s}: {e}"))
    })
}

/// `name` from the environment, else `default`.
///
/// # Panics
/// When `name` is set but not a number.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |s| {
        let s = s.trim();
        s.parse().unwrap_or_else(|e| panic!("{name}={s}: {e}"))
    })
}

/// `SplitMix64`: tiny, seedable, and the same on every platform and version,
/// so a seed printed by a failure reproduces it anywhere.
pub struct Rng(u64);

impl Rng {
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The generator of packet `index` of run `seed`.
    pub fn for_packet(seed: u64, index: usize) -> Self {
        let mut r = Self(seed ^ (index as u64).wrapping_mul(0xA076_1D64_78BD_642F));
        r.next();
        r
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is irrelevant here.
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    pub fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }

    /// Uniform in `0..n`.
    pub fn small(&mut self, n: u8) -> u8 {
        u8::try_from(self.below(usize::from(n))).unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}
