//! Whether this kernel has what the programs and the daemon need, checked
//! before `up` loads or attaches anything. An older kernel is refused with
//! each missing feature named, instead of attaching, then failing: loading
//! stops at the first helper the verifier does not know, and the audit
//! sweep's lookup-and-delete (5.14) fails only at its first sweep, with the
//! programs already enforcing and no trail behind them.
//!
//! Each feature is tried, not inferred from the version number: distribution
//! kernels backport features, and configurations leave some out.

use std::{error::Error, fmt, io, os::fd::AsFd as _};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, Map, MapData, MapType},
    programs::{ProgramType, SchedClassifier, TcAttachType, Xdp},
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use aya_obj::generated::bpf_map_type;
use zt_common::{FlowSummary, SummaryKey};

use crate::{
    attach::{self, AttachError},
    audit::kernel::lookup_and_delete,
    loader,
};

/// The oldest Linux with every feature below: lookup-and-delete on hash
/// maps came last (`kernel/bpf/hashtab.c`, 5.14).
pub const MINIMUM_KERNEL: &str = "5.14";

/// Kernel `ENOTSUPP` (not the C library's `ENOTSUP`): what a syscall answers
/// for an operation a map type does not implement.
const ENOTSUPP: i32 = 524;

/// The interface the attach checks use: the private namespace's loopback,
/// the only one it has.
const LOOPBACK: &str = "lo";

type Source = Box<dyn Error + Send + Sync>;

/// Why `up` will not start on this kernel.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "this kernel ({release}) lacks {}; ztxdp needs Linux {MINIMUM_KERNEL} or newer \
         (see \"Supported kernels\" in the README)",
        list(.missing)
    )]
    Unsupported {
        release: String,
        missing: Vec<Feature>,
    },
    /// The kernel would not let this process try a feature (`EPERM`,
    /// `EACCES`): a question of privileges, not of the kernel's version.
    #[error("the kernel refused to let this process try {feature}")]
    Refused {
        feature: Feature,
        #[source]
        source: Source,
    },
    #[error("could not check whether this kernel ({release}) supports {feature}")]
    Check {
        release: String,
        feature: Feature,
        #[source]
        source: Source,
    },
}

fn list(features: &[Feature]) -> String {
    features
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The program types the object's programs have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `zt_edge`.
    Xdp,
    /// `zt_tunnel` and the egress flow recorders.
    Tc,
}

impl Hook {
    fn program_type(self) -> ProgramType {
        match self {
            Self::Xdp => ProgramType::Xdp,
            Self::Tc => ProgramType::SchedClassifier,
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Xdp => "XDP",
            Self::Tc => "tc",
        })
    }
}

/// A helper the programs call: its kernel name, the release that added it,
/// and whether the tc programs alone call it.
#[derive(Debug, PartialEq, Eq)]
pub struct Helper {
    pub id: BpfHelper,
    pub name: &'static str,
    pub since: &'static str,
    pub tc_only: bool,
}

const fn helper(id: BpfHelper, name: &'static str, since: &'static str) -> Helper {
    Helper {
        id,
        name,
        since,
        tc_only: false,
    }
}

/// Every helper the BPF object calls (a test reads the object and checks
/// this list is complete).
pub static HELPERS: [Helper; 9] = [
    helper(
        BpfHelper::BPF_FUNC_map_lookup_elem,
        "bpf_map_lookup_elem",
        "3.19",
    ),
    helper(
        BpfHelper::BPF_FUNC_map_update_elem,
        "bpf_map_update_elem",
        "3.19",
    ),
    helper(BpfHelper::BPF_FUNC_ktime_get_ns, "bpf_ktime_get_ns", "4.1"),
    helper(
        BpfHelper::BPF_FUNC_get_smp_processor_id,
        "bpf_get_smp_processor_id",
        "4.1",
    ),
    Helper {
        tc_only: true,
        ..helper(
            BpfHelper::BPF_FUNC_skb_pull_data,
            "bpf_skb_pull_data",
            "4.9",
        )
    },
    helper(BpfHelper::BPF_FUNC_jiffies64, "bpf_jiffies64", "5.5"),
    helper(
        BpfHelper::BPF_FUNC_ringbuf_reserve,
        "bpf_ringbuf_reserve",
        "5.8",
    ),
    helper(
        BpfHelper::BPF_FUNC_ringbuf_submit,
        "bpf_ringbuf_submit",
        "5.8",
    ),
    helper(
        BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
        "bpf_ktime_get_coarse_ns",
        "5.11",
    ),
];

/// Something the programs or the daemon need from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// Loading a program of this type at all.
    Programs(Hook),
    /// `BPF_MAP_TYPE_RINGBUF`: the decision events.
    RingBuffer,
    /// A helper, in programs of one type.
    Helper(&'static Helper, Hook),
    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on an LRU hash map: how the audit
    /// sweep takes flow summaries.
    LookupAndDelete,
    /// An XDP program attached to an interface through netlink.
    XdpAttach,
    /// A classifier attached to a clsact qdisc (`sch_ingress`, `cls_bpf`).
    TcAttach,
}

impl Feature {
    /// The Linux release that brought it.
    #[must_use]
    pub fn since(self) -> &'static str {
        match self {
            Self::Programs(Hook::Xdp) | Self::XdpAttach => "4.8",
            Self::Programs(Hook::Tc) => "4.1",
            Self::TcAttach => "4.5",
            Self::RingBuffer => "5.8",
            Self::Helper(helper, _) => helper.since,
            Self::LookupAndDelete => "5.14",
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Programs(hook) => write!(f, "{hook} BPF programs"),
            Self::RingBuffer => f.write_str("BPF ring buffer maps"),
            Self::Helper(helper, hook) => {
                write!(f, "the helper {} in {hook} programs", helper.name)
            }
            Self::LookupAndDelete => f.write_str("BPF_MAP_LOOKUP_AND_DELETE_ELEM on LRU hash maps"),
            Self::XdpAttach => f.write_str("attaching XDP programs through netlink"),
            Self::TcAttach => f.write_str("attaching tc programs to a clsact qdisc"),
        }?;
        write!(f, " (Linux {})", self.since())
    }
}

/// Everything loading the programs and running the daemon needs, in the
/// order checked: the program types first, as the helper checks load
/// programs of those types.
#[must_use]
pub fn load_features() -> Vec<Feature> {
    let mut features = vec![
        Feature::Programs(Hook::Xdp),
        Feature::Programs(Hook::Tc),
        Feature::RingBuffer,
        Feature::LookupAndDelete,
    ];
    for hook in [Hook::Xdp, Hook::Tc] {
        features.extend(
            HELPERS
                .iter()
                .filter(|h| hook == Hook::Tc || !h.tc_only)
                .map(|h| Feature::Helper(h, hook)),
        );
    }
    features
}

/// Checks every feature `up` needs: [`programs_and_maps`], then attaching
/// (in a network namespace of the probe's own, on its loopback, so nothing
/// outside it ever sees a probe program).
///
/// # Errors
/// [`ProbeError::Unsupported`] naming every missing feature,
/// [`ProbeError::Refused`] without the privileges to try them, or
/// [`ProbeError::Check`] when a check itself fails.
pub fn kernel() -> Result<(), ProbeError> {
    programs_and_maps()?;
    attaching()
}

/// Checks what loading the programs and running the audit trail need:
/// [`load_features`].
///
/// # Errors
/// As [`kernel`].
pub fn programs_and_maps() -> Result<(), ProbeError> {
    let mut object = ProbeObject::default();
    evaluate(&release(), &load_features(), |f| check(f, &mut object))
}

/// Runs `check` on every feature; `Ok(false)` from it means the kernel lacks
/// that feature. All missing features are reported together; a check that
/// fails stops the probe, as [`ProbeError::Refused`] when the kernel refused
/// it for lack of privileges.
fn evaluate(
    release: &str,
    features: &[Feature],
    mut check: impl FnMut(Feature) -> Result<bool, Source>,
) -> Result<(), ProbeError> {
    let mut missing = Vec::new();
    for &feature in features {
        match check(feature) {
            Ok(true) => {}
            Ok(false) => missing.push(feature),
            Err(source) if crate::report::refused(&*source) => {
                return Err(ProbeError::Refused { feature, source });
            }
            Err(source) => {
                return Err(ProbeError::Check {
                    release: release.to_owned(),
                    feature,
                    source,
                });
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ProbeError::Unsupported {
            release: release.to_owned(),
            missing,
        })
    }
}

/// The running kernel's release (`uname -r`), for messages.
fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown release".to_owned(), |r| r.trim().to_owned())
}

fn check(feature: Feature, object: &mut ProbeObject) -> Result<bool, Source> {
    match feature {
        Feature::Programs(hook) => Ok(is_program_supported(hook.program_type())?),
        Feature::RingBuffer => Ok(is_map_supported(MapType::RingBuf)?),
        Feature::Helper(helper, hook) => Ok(is_helper_supported(hook.program_type(), helper.id)?),
        Feature::LookupAndDelete => lookup_and_delete_supported(),
        Feature::XdpAttach | Feature::TcAttach => attach_supported(feature, object.get()?),
    }
}

/// [`crate::PROBE_OBJECT`], loaded once, when an attach check first needs
/// it: every load parses the kernel's BTF, the slowest part of the probe.
#[derive(Default)]
struct ProbeObject(Option<Ebpf>);

impl ProbeObject {
    fn get(&mut self) -> Result<&mut Ebpf, Source> {
        Ok(match &mut self.0 {
            Some(ebpf) => ebpf,
            slot @ None => slot.insert(EbpfLoader::new().load(crate::PROBE_OBJECT)?),
        })
    }
}

/// Takes an element out of an LRU hash map of the summary table's shape.
fn lookup_and_delete_supported() -> Result<bool, Source> {
    let size = |n: usize| u32::try_from(n).map_err(|_| "map element too large");
    let definition = aya_obj::Map::new_from_params(
        bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32,
        size(size_of::<SummaryKey>())?,
        size(size_of::<FlowSummary>())?,
        1,
        0,
    );
    let mut map = Map::LruHashMap(MapData::create(definition, "zt_probe", None)?);
    let key = SummaryKey::default();
    BpfHashMap::<_, SummaryKey, FlowSummary>::try_from(&mut map)?.insert(
        key,
        FlowSummary::default(),
        0,
    )?;
    let Map::LruHashMap(data) = &map else {
        return Err("the probe's map changed type".into());
    };
    lookup_and_delete_outcome(lookup_and_delete(data.fd().as_fd(), &key))
}

/// What lookup-and-delete of an element just inserted says about the
/// kernel: before 5.14 hash maps answer `ENOTSUPP` (`EINVAL` on kernels
/// that check the command's fields first).
fn lookup_and_delete_outcome(result: io::Result<Option<FlowSummary>>) -> Result<bool, Source> {
    match result {
        Ok(Some(_)) => Ok(true),
        Ok(None) => Err("the element just inserted was not found".into()),
        Err(e) if matches!(e.raw_os_error(), Some(ENOTSUPP | libc::EINVAL)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// [`Feature::XdpAttach`] and [`Feature::TcAttach`], checked in a thread
/// moved into a new network namespace. Where namespaces cannot be created
/// (a service with `RestrictNamespaces=`, no `CAP_SYS_ADMIN`) they are not
/// checked: `up` attaches its tc egress recorders first, so a kernel without
/// clsact refuses that before anything else is attached.
fn attaching() -> Result<(), ProbeError> {
    let release = release();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare has no memory-safety preconditions; it
                // moves only this thread into a new network namespace, which
                // goes away when the thread ends.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    tracing::info!(
                        error = %io::Error::last_os_error(),
                        "no private network namespace for the attach probe; attaching is \
                         checked when it happens"
                    );
                    return Ok(());
                }
                let mut object = ProbeObject::default();
                evaluate(
                    &release,
                    &[Feature::XdpAttach, Feature::TcAttach],
                    |feature| check(feature, &mut object),
                )
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Attaches a probe program to the loopback of this thread's (private)
/// network namespace, the way `up` attaches its own.
fn attach_supported(feature: Feature, ebpf: &mut Ebpf) -> Result<bool, Source> {
    let attached = if feature == Feature::XdpAttach {
        let prog: &mut Xdp = loader::program_mut(ebpf, "zt_probe_xdp")?;
        prog.load()?;
        let fd = prog.fd()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        runtime.block_on(async {
            let handle = attach::connect()?;
            attach::attach_xdp(&handle, LOOPBACK, fd, None)
                .await
                .map(drop)
        })
    } else {
        let prog: &mut SchedClassifier = loader::program_mut(ebpf, "zt_probe_tc")?;
        prog.load()?;
        attach::attach_tc(prog, LOOPBACK, TcAttachType::Ingress, false)
    };
    match attached {
        Ok(()) => Ok(true),
        Err(e @ (AttachError::XdpAttach { .. } | AttachError::Tc { .. })) => {
            tracing::warn!(error = %e, feature = %feature, "the kernel refused the attach probe");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests;
