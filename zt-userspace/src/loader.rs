//! Loading the BPF object into the kernel (verification, map creation),
//! without attaching anything: attaching is `netlink`'s job, so a program
//! can be loaded and filled completely before it sees a packet.

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, SchedClassifier, Xdp},
};
use zt_common::{
    EDGE_AUDIT, EDGE_CONFIGURED, EdgeConfig, SUMMARY_CACHE_SLOTS, global, map, program,
};

use crate::{
    policy::{EdgePolicy, FlowSettings, Mode, TunnelPolicy},
    probe::{self, ProbeError},
    tables::{Tables, TablesError},
};

/// Errors while loading the BPF object.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the BPF object failed")]
    Object(#[source] aya::EbpfError),
    /// The kernel refused a map or program for lack of privileges: the
    /// kernel's version is not in question.
    #[error("the kernel refused to load the BPF object")]
    Refused(#[source] aya::EbpfError),
    /// This kernel lacks what the programs need, found by the kernel probe.
    #[error(transparent)]
    Kernel(#[from] ProbeError),
    #[error("the BPF object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error("could not read this machine's CPU numbers from {POSSIBLE_CPUS}")]
    Cpus {
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel refused program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("writing the policy into the maps")]
    Fill(#[from] TablesError),
}

/// How the programs are specialised at load time.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// The tunnel device has an Ethernet header (a veth); `false` for a
    /// `WireGuard` device, where packets start at the IP header.
    pub tunnel_l2: bool,
    /// `tunnel.link_local_neighbors`: on an Ethernet tunnel device, ARP and
    /// neighbour messages from link-local sources pass too.
    pub tunnel_link_local: bool,
    /// Size of the flow table (`flows.max_entries`).
    pub flow_entries: u32,
    /// Whether there is an edge policy; without one the edge program drops
    /// everything as `not_configured`. Fixed at load: the verifier folds it
    /// into the program.
    pub edge: bool,
    /// The edge's mode (`mode`; only with an edge policy). Fixed at load,
    /// like `edge`.
    pub edge_mode: Mode,
    /// The tunnel program's mode for packets from no peer's address. Each
    /// peer's own mode is in its `PeerInfo`.
    pub tunnel_mode: Mode,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            tunnel_l2: false,
            tunnel_link_local: false,
            flow_entries: zt_common::capacity::FLOWS_DEFAULT,
            edge: false,
            edge_mode: Mode::Enforce,
            tunnel_mode: Mode::Enforce,
        }
    }
}

/// Loads every program (`zt_edge`, `zt_tunnel` and the two egress flow
/// recorders) with fresh, empty maps.
///
/// # Errors
/// When the object or a program is rejected by the kernel.
pub fn load(opts: LoadOptions) -> Result<Ebpf, LoadError> {
    relax_memlock();
    let cpus = cpu_slots()?;
    let edge = if opts.edge {
        EdgeConfig {
            _pad0: 0,
            flags: EDGE_CONFIGURED
                | if opts.edge_mode == Mode::Audit {
                    EDGE_AUDIT
                } else {
                    0
                },
        }
    } else {
        EdgeConfig::default()
    };
    let mut ebpf = EbpfLoader::new()
        .override_global(global::TUNNEL_L2, &u8::from(opts.tunnel_l2), true)
        .override_global(
            global::TUNNEL_LINK_LOCAL,
            &u8::from(opts.tunnel_link_local),
            true,
        )
        .override_global(
            global::TUNNEL_AUDIT,
            &u8::from(opts.tunnel_mode == Mode::Audit),
            true,
        )
        .override_global(global::EDGE_CONFIG, &edge, true)
        .map_max_entries(map::FLOWS, opts.flow_entries)
        // The CPUs' entries and the ledger after them.
        .map_max_entries(map::CPU_STATE, cpus.saturating_add(1))
        .map_max_entries(map::SUMMARY_CACHE, cpus.saturating_mul(SUMMARY_CACHE_SLOTS))
        .load(crate::BPF_OBJECT)
        .map_err(|e| {
            if crate::report::refused(&e) {
                LoadError::Refused(e)
            } else {
                explain(LoadError::Object(e))
            }
        })?;
    let edge: &mut Xdp = program_mut(&mut ebpf, program::EDGE_NAME)?;
    edge.load().map_err(|source| {
        explain(LoadError::Program {
            name: program::EDGE_NAME,
            source,
        })
    })?;
    for name in [
        program::TUNNEL_NAME,
        program::EDGE_EGRESS_NAME,
        program::TUNNEL_EGRESS_NAME,
    ] {
        let tc: &mut SchedClassifier = program_mut(&mut ebpf, name)?;
        tc.load()
            .map_err(|source| explain(LoadError::Program { name, source }))?;
    }
    Ok(ebpf)
}

/// A load the kernel refused, explained by the kernel probe when this
/// kernel lacks something the programs need (the verifier's own message
/// names only a helper's number); otherwise `error` as it is.
fn explain(error: LoadError) -> LoadError {
    match probe::programs_and_maps() {
        Err(missing @ ProbeError::Unsupported { .. }) => LoadError::Kernel(missing),
        Ok(()) | Err(ProbeError::Refused { .. } | ProbeError::Check { .. }) => error,
    }
}

/// The programs loaded for a policy, with every map filled from it: what
/// `ztxdp up` attaches, and what the tests and benchmarks run. Nothing is
/// attached yet, so a program never sees a packet with half a policy.
///
/// # Errors
/// When loading fails or a map cannot take the policy.
pub fn load_filled(
    tunnel_l2: bool,
    edge: Option<&EdgePolicy>,
    tunnel: Option<&TunnelPolicy>,
    flows: &FlowSettings,
) -> Result<(Ebpf, Tables), LoadError> {
    let mut ebpf = load(LoadOptions {
        tunnel_l2,
        tunnel_link_local: tunnel.is_some_and(|t| t.link_local_neighbors),
        flow_entries: flows.max_entries,
        edge: edge.is_some(),
        edge_mode: edge.map(|e| e.mode).unwrap_or_default(),
        tunnel_mode: tunnel.map(|t| t.mode).unwrap_or_default(),
    })?;
    let mut tables = Tables::from_ebpf(&mut ebpf)?;
    tables.apply_flows(flows, edge.map(|e| e.icmp_echo).unwrap_or_default())?;
    if let Some(e) = edge {
        tables.apply_edge(e)?;
    }
    if let Some(t) = tunnel {
        tables.apply_tunnel(t)?;
    }
    Ok((ebpf, tables))
}

/// The kernel ids of every map the loaded programs use, each once.
#[must_use]
pub fn map_ids(ebpf: &Ebpf) -> Vec<u32> {
    let mut ids: Vec<u32> = ebpf
        .programs()
        .filter_map(|(_, p)| p.info().ok())
        .filter_map(|info| info.map_ids().ok().flatten())
        .flatten()
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Where the kernel lists the CPUs that can ever come online.
const POSSIBLE_CPUS: &str = "/sys/devices/system/cpu/possible";

/// Entries the CPU-indexed arrays (`zt_common::CpuState`) need: one per CPU
/// number up to the highest possible CPU. Not the count of possible CPUs
/// (aya's `nr_cpus`): the list can have gaps (`0-3,8-11`), and a CPU without
/// an entry drops every packet.
///
/// # Errors
/// When the list cannot be read or parsed.
pub fn cpu_slots() -> Result<u32, LoadError> {
    let list =
        std::fs::read_to_string(POSSIBLE_CPUS).map_err(|source| LoadError::Cpus { source })?;
    highest_cpu(&list)
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| LoadError::Cpus {
            source: std::io::Error::other(format!("unexpected CPU list {:?}", list.trim())),
        })
}

/// Where the ledger ([`zt_common::Ledger`]) is in a state array of
/// `entries`: after the CPUs'. `None` when there is no entry for it
/// (programs loaded by an older build).
///
/// # Errors
/// When the CPUs cannot be counted.
pub fn ledger_index(entries: u32) -> Result<Option<u32>, LoadError> {
    let cpus = cpu_slots()?;
    Ok((entries == cpus.saturating_add(1)).then_some(cpus))
}

/// The highest CPU number in a kernel CPU list such as `0-3,8-11`.
fn highest_cpu(list: &str) -> Option<u32> {
    list.trim()
        .split(',')
        .map(|range| range.rsplit('-').next().and_then(|n| n.parse::<u32>().ok()))
        .try_fold(None, |max: Option<u32>, n| Some(max.max(Some(n?))))
        .flatten()
}

/// A typed handle on one of the object's programs.
///
/// # Errors
/// When the object has no program of that name and type.
pub fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(LoadError::MissingProgram { name })
}

/// Kernels before 5.11 charge BPF memory to `RLIMIT_MEMLOCK`. Newer ones use
/// memcg accounting, and raising the limit needs `CAP_SYS_RESOURCE`, which
/// containers often lack; so a failure here is logged, not fatal.
fn relax_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK; fine on kernels 5.11 and later"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::highest_cpu;

    #[test]
    fn the_highest_cpu_number_counts_not_the_number_of_cpus() {
        assert_eq!(highest_cpu("0\n"), Some(0));
        assert_eq!(highest_cpu("0-1\n"), Some(1));
        // A list with a gap: 8 CPUs, numbered up to 11.
        assert_eq!(highest_cpu("0-3,8-11\n"), Some(11));
        assert_eq!(highest_cpu("0,2,5-6"), Some(6));
        assert_eq!(highest_cpu(""), None);
        assert_eq!(highest_cpu("0-x"), None);
    }
}
