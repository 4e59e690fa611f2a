//! Attaching, finding and detaching the programs, always in the current
//! network namespace.
//!
//! Both programs are attached the "sticky" way, through netlink rather than
//! as `bpf_links`: a `bpf_link` dies with the last file descriptor, so a crash of
//! the daemon would open the host. A netlink XDP attachment or clsact filter
//! stays until removed, and is found again by interface from any process;
//! its maps are then opened by kernel id (see `tables::Tables::from_map_ids`).

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::programs::{
    ProgramFd, ProgramInfo, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use futures_util::TryStreamExt as _;
use netlink_packet_route::{
    link::{LinkAttribute, LinkXdp, XdpAttached},
    tc::{TcAttribute, TcFilterBpfOption, TcOption},
};
use rtnetlink::{Handle, LinkUnspec};
use zt_common::program;

/// `XDP_FLAGS_UPDATE_IF_NOEXIST`: refuse to clobber a program we did not put there.
const XDP_FLAGS_UPDATE_IF_NOEXIST: u32 = 1 << 0;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// `XDP_FLAGS_REPLACE`: swap atomically, only if the expected program is attached.
const XDP_FLAGS_REPLACE: u32 = 1 << 4;

/// Our clsact filter's fixed priority and handle, so a restart can find and
/// replace it in place instead of stacking a second filter.
const TC_PRIORITY: u16 = 1;
const TC_HANDLE: TcHandle = TcHandle::new(0, TC_HANDLE_MINOR);
const TC_HANDLE_MINOR: u16 = 0x7a74;

/// Errors attaching, finding or detaching.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink request failed on {interface}: {source}")]
    Netlink {
        interface: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no interface {interface} in this network namespace")]
    NoInterface { interface: String },
    #[error(
        "{interface} already has XDP program {name:?} (id {id}) that is not ztxdp's; \
         remove it first (ip link set dev {interface} xdp off)"
    )]
    ForeignXdp {
        interface: String,
        id: u32,
        name: String,
    },
    #[error("attaching XDP to {interface} failed in native and generic mode: {source}")]
    XdpAttach {
        interface: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("TC on {interface}: {source}")]
    Tc {
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("TCX programs of {interface}: {source}")]
    Tcx {
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("BPF program id {id}: {source}")]
    ProgramInfo {
        id: u32,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// How an XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver: runs before the kernel allocates an skb.
    Native,
    /// Generic (skb) mode: works on every device, slower.
    Generic,
}

/// A program of ours found attached to an interface.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attachment {
    /// Kernel name of the program (`zt_edge`, `zt_tunnel`, ...).
    pub program: String,
    pub interface: String,
    pub ifindex: u32,
    pub program_id: u32,
    /// `native`/`generic` for XDP; `clsact-ingress`/`clsact-egress` for the
    /// netlink tc filters (not TCX: a TCX link dies with its last fd unless
    /// pinned, and bpffs pins do not survive `ip netns exec`).
    pub mode: String,
    /// Kernel ids of the program's maps.
    #[serde(skip)]
    pub map_ids: Vec<u32>,
}

/// Everything of ours attached in this namespace.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Attached {
    pub edge: Vec<Attachment>,
    pub tunnel: Vec<Attachment>,
    /// Egress flow recorders (`zt_edge_out`, `zt_tunnel_out`).
    pub egress: Vec<Attachment>,
}

impl Attached {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.edge.is_empty() && self.tunnel.is_empty() && self.egress.is_empty()
    }

    /// The interfaces the edge and the tunnel programs run on (the first
    /// of each), as the flow table's keys name them.
    #[must_use]
    pub fn flow_interfaces(&self) -> crate::tables::FlowInterfaces {
        crate::tables::FlowInterfaces {
            edge: self.edge.first().map(|a| a.ifindex),
            tunnel: self.tunnel.first().map(|a| a.ifindex),
        }
    }

    /// The kernel ids of every map the attached programs use, each once.
    #[must_use]
    pub fn map_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .edge
            .iter()
            .chain(&self.tunnel)
            .chain(&self.egress)
            .flat_map(|a| a.map_ids.iter().copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// A netlink connection bound to the current network namespace.
///
/// # Errors
/// When the socket cannot be opened.
pub fn connect() -> Result<Handle, AttachError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(AttachError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The index of `interface` in this namespace.
///
/// # Errors
/// When there is no such interface.
pub fn ifindex(interface: &str) -> Result<u32, AttachError> {
    let name = std::ffi::CString::new(interface).map_err(|_| AttachError::NoInterface {
        interface: interface.to_owned(),
    })?;
    // SAFETY: `name` is a valid NUL-terminated string for the whole call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(AttachError::NoInterface {
            interface: interface.to_owned(),
        }),
        i => Ok(i),
    }
}

/// The loaded program `id`, found by walking the kernel's program list.
/// Programs come and go on a busy host while the walk runs: one unloaded
/// between being listed and being opened (`ENOENT`) is skipped, not taken
/// for a failure of the walk. If it was `id`, the answer is that `id` is
/// gone, as it would be a moment later anyway.
fn program_info(id: u32) -> Result<Option<ProgramInfo>, AttachError> {
    for info in aya::programs::loaded_programs() {
        let info = match info {
            Ok(info) => info,
            Err(e) if vanished(&e) => continue,
            Err(source) => return Err(AttachError::ProgramInfo { id, source }),
        };
        if info.id() == id {
            return Ok(Some(info));
        }
    }
    Ok(None)
}

/// Whether a step of the program walk failed because its program was
/// unloaded meanwhile.
fn vanished(e: &aya::programs::ProgramError) -> bool {
    matches!(
        e,
        aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. })
            if io_error.raw_os_error() == Some(libc::ENOENT)
    )
}

fn attachment(
    interface: String,
    ifindex: u32,
    id: u32,
    mode: &str,
    name: &str,
) -> Result<Option<Attachment>, AttachError> {
    let Some(info) = program_info(id)? else {
        return Ok(None);
    };
    if info.name_as_str() != Some(name) {
        return Ok(None);
    }
    let map_ids = info
        .map_ids()
        .map_err(|source| AttachError::ProgramInfo { id, source })?
        .unwrap_or_default();
    Ok(Some(Attachment {
        program: name.to_owned(),
        interface,
        ifindex,
        program_id: id,
        mode: mode.to_owned(),
        map_ids,
    }))
}

/// Finds our programs on every interface of this namespace.
///
/// # Errors
/// When netlink or the BPF object lookups fail.
pub async fn find(handle: &Handle) -> Result<Attached, AttachError> {
    let mut out = Attached::default();
    let links: Vec<_> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|source| AttachError::Netlink {
            interface: "(all)".into(),
            source,
        })?;
    for link in links {
        let ifindex = link.header.index;
        let mut name = String::new();
        let mut xdp = None;
        for attr in &link.attributes {
            match attr {
                LinkAttribute::IfName(n) => name.clone_from(n),
                LinkAttribute::Xdp(x) => xdp = Some(xdp_state(x)),
                _ => {}
            }
        }
        if let Some((id, mode)) = xdp.flatten()
            && let Some(a) = attachment(name.clone(), ifindex, id, mode, program::EDGE_NAME)?
        {
            out.edge.push(a);
        }
        for id in tc_program_ids(handle, ifindex, &name, TcAttachType::Ingress).await? {
            if let Some(a) = attachment(
                name.clone(),
                ifindex,
                id,
                "clsact-ingress",
                program::TUNNEL_NAME,
            )? {
                out.tunnel.push(a);
            }
        }
        for id in tc_program_ids(handle, ifindex, &name, TcAttachType::Egress).await? {
            for prog in [program::EDGE_EGRESS_NAME, program::TUNNEL_EGRESS_NAME] {
                if let Some(a) = attachment(name.clone(), ifindex, id, "clsact-egress", prog)? {
                    out.egress.push(a);
                }
            }
        }
    }
    Ok(out)
}

/// The attached XDP program's id and mode, if any.
fn xdp_state(attrs: &[LinkXdp]) -> Option<(u32, &'static str)> {
    let mut id = None;
    let mut mode = None;
    for a in attrs {
        match a {
            LinkXdp::ProgId(i) => id = Some(*i),
            LinkXdp::Attached(XdpAttached::Driver) => mode = Some("native"),
            LinkXdp::Attached(XdpAttached::SocketBuffer) => mode = Some("generic"),
            LinkXdp::Attached(XdpAttached::Hardware) => mode = Some("offload"),
            _ => {}
        }
    }
    Some((id?, mode.unwrap_or("unknown")))
}

async fn tc_program_ids(
    handle: &Handle,
    ifindex: u32,
    name: &str,
    direction: TcAttachType,
) -> Result<Vec<u32>, AttachError> {
    Ok(tc_filters(handle, ifindex, name, direction)
        .await
        .into_iter()
        .filter_map(|f| f.program_id)
        .collect())
}

/// One clsact filter, as netlink lists it.
struct TcFilter {
    /// `bpf`, `u32`, `matchall`, ...
    kind: String,
    priority: u16,
    handle: u32,
    /// The BPF program it runs, for a `bpf` filter.
    program_id: Option<u32>,
}

/// The clsact filters of one direction of an interface.
async fn tc_filters(
    handle: &Handle,
    ifindex: u32,
    name: &str,
    direction: TcAttachType,
) -> Vec<TcFilter> {
    let Ok(index) = i32::try_from(ifindex) else {
        return Vec::new();
    };
    let request = handle.traffic_filter(index).get();
    let request = if direction == TcAttachType::Ingress {
        request.ingress()
    } else {
        request.egress()
    };
    let filters: Result<Vec<_>, _> = request.execute().try_collect().await;
    // An interface without clsact answers with an error: no filters, not a failure.
    let Ok(filters) = filters else {
        tracing::trace!(interface = name, ?direction, "no clsact filters");
        return Vec::new();
    };
    let mut out = Vec::new();
    for f in filters {
        let mut kind = String::new();
        let mut program_id = None;
        for attr in f.attributes {
            match attr {
                TcAttribute::Kind(k) => kind = k,
                TcAttribute::Options(opts) => {
                    for o in opts {
                        if let TcOption::Bpf(TcFilterBpfOption::ProgId(id)) = o {
                            program_id = Some(id);
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(TcFilter {
            kind,
            // The priority is the upper half of `tcm_info`.
            priority: u16::try_from(f.header.info >> 16).unwrap_or(u16::MAX),
            handle: (u32::from(f.header.handle.major) << 16) | u32::from(f.header.handle.minor),
            program_id,
        });
    }
    out
}

/// Where on an interface a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    /// XDP, in any mode.
    Xdp,
    /// A clsact filter on ingress (how ztxdp attaches its tunnel program).
    TcIngress,
    /// A clsact filter on egress (ztxdp's flow recorders).
    TcEgress,
    /// TCX (a `bpf_link`, kernel 6.6+), which runs before the clsact filters.
    TcxIngress,
    TcxEgress,
}

impl Hook {
    /// The name reports use.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::TcIngress => "tc-ingress",
            Self::TcEgress => "tc-egress",
            Self::TcxIngress => "tcx-ingress",
            Self::TcxEgress => "tcx-egress",
        }
    }
}

/// Something that runs on one of an interface's hooks, whoever put it
/// there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookEntry {
    pub hook: Hook,
    /// The BPF program's kernel name; for a tc filter that runs no BPF
    /// program, the filter's kind (`u32`, `matchall`, ...).
    pub name: String,
    pub program_id: Option<u32>,
    /// `bpf_prog_info.tag`: a hash of the program's instructions as
    /// loaded, map references left out (see [`crate::drift`]).
    pub tag: Option<u64>,
    /// Kernel ids of the program's maps.
    pub map_ids: Vec<u32>,
    /// Whether it sits where ztxdp attaches its filters: a clsact filter
    /// with ztxdp's priority and handle.
    pub our_slot: bool,
}

/// Everything on the XDP, clsact and TCX hooks of `interface`, ztxdp's
/// programs and others alike, in hook order. A tc filter is listed once
/// per BPF program, or once per kind when it runs none.
///
/// # Errors
/// When the interface does not exist, or netlink or a program lookup
/// fails.
pub async fn hooks(handle: &Handle, interface: &str) -> Result<Vec<HookEntry>, AttachError> {
    let (index, xdp) = current_xdp(handle, interface).await?;
    let mut out = Vec::new();
    if let Some((id, _)) = xdp {
        out.extend(hook_program(Hook::Xdp, id, false)?);
    }
    for (hook, direction) in [
        (Hook::TcIngress, TcAttachType::Ingress),
        (Hook::TcEgress, TcAttachType::Egress),
    ] {
        let mut kinds = Vec::new();
        for f in tc_filters(handle, index, interface, direction).await {
            let ours = f.priority == TC_PRIORITY && f.handle == u32::from(TC_HANDLE_MINOR);
            match f.program_id {
                Some(id) => out.extend(hook_program(hook, id, ours)?),
                // A filter's head entry (kind, no handle) comes before its
                // filters; only filters that run no BPF program are listed.
                None if f.kind != "bpf" && !kinds.contains(&f.kind) => {
                    kinds.push(f.kind.clone());
                    out.push(HookEntry {
                        hook,
                        name: f.kind,
                        program_id: None,
                        tag: None,
                        map_ids: Vec::new(),
                        our_slot: false,
                    });
                }
                None => {}
            }
        }
    }
    for (hook, direction) in [
        (Hook::TcxIngress, TcAttachType::Ingress),
        (Hook::TcxEgress, TcAttachType::Egress),
    ] {
        let programs = match SchedClassifier::query_tcx(interface, direction) {
            Ok((_, programs)) => programs,
            // Before kernel 6.6 there is no TCX hook, so nothing on it.
            Err(aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                io_error,
                ..
            })) if io_error.raw_os_error() == Some(libc::EINVAL) => Vec::new(),
            Err(source) => {
                return Err(AttachError::Tcx {
                    interface: interface.to_owned(),
                    source,
                });
            }
        };
        for info in programs {
            out.push(entry(hook, &info, false)?);
        }
    }
    Ok(out)
}

/// The hook entry of program `id`; none if it was unloaded meanwhile.
fn hook_program(hook: Hook, id: u32, our_slot: bool) -> Result<Option<HookEntry>, AttachError> {
    program_info(id)?
        .map(|info| entry(hook, &info, our_slot))
        .transpose()
}

fn entry(hook: Hook, info: &ProgramInfo, our_slot: bool) -> Result<HookEntry, AttachError> {
    let id = info.id();
    Ok(HookEntry {
        hook,
        name: info.name_as_str().unwrap_or_default().to_owned(),
        program_id: Some(id),
        tag: Some(info.tag()),
        map_ids: info
            .map_ids()
            .map_err(|source| AttachError::ProgramInfo { id, source })?
            .unwrap_or_default(),
        our_slot,
    })
}

/// The index of `interface`, and the id and mode of its XDP program, if
/// it has one.
async fn current_xdp(
    handle: &Handle,
    interface: &str,
) -> Result<(u32, Option<(u32, &'static str)>), AttachError> {
    let index = ifindex(interface)?;
    let links: Vec<_> = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_collect()
        .await
        .map_err(|source| AttachError::Netlink {
            interface: interface.to_owned(),
            source,
        })?;
    let xdp = links.iter().flat_map(|l| &l.attributes).find_map(|a| {
        if let LinkAttribute::Xdp(x) = a {
            xdp_state(x)
        } else {
            None
        }
    });
    Ok((index, xdp))
}

/// Attaches (or atomically replaces our earlier) XDP program on `interface`.
/// Native mode first; generic when the driver has no XDP support.
///
/// # Errors
/// When another tool's program is attached, or the kernel refuses.
pub async fn attach_xdp(
    handle: &Handle,
    interface: &str,
    prog: &ProgramFd,
    previous: Option<&Attachment>,
) -> Result<XdpMode, AttachError> {
    let (ifindex, current) = current_xdp(handle, interface).await?;
    let mut replace: Option<(ProgramFd, &'static str)> = None;
    if let Some((id, mode)) = current {
        match previous {
            Some(p) if p.program_id == id => {
                let info = program_info(id)?.ok_or(AttachError::ForeignXdp {
                    interface: interface.to_owned(),
                    id,
                    name: String::from("(gone)"),
                })?;
                let fd = info
                    .fd()
                    .map_err(|source| AttachError::ProgramInfo { id, source })?;
                replace = Some((fd, mode));
            }
            _ => {
                let name = program_info(id)?
                    .and_then(|i| i.name_as_str().map(str::to_owned))
                    .unwrap_or_default();
                return Err(AttachError::ForeignXdp {
                    interface: interface.to_owned(),
                    id,
                    name,
                });
            }
        }
    }
    let modes: &[(u32, XdpMode)] = match replace.as_ref().map(|r| r.1) {
        Some("generic") => &[(XDP_FLAGS_SKB_MODE, XdpMode::Generic)],
        Some(_) => &[(XDP_FLAGS_DRV_MODE, XdpMode::Native)],
        None => &[
            (XDP_FLAGS_DRV_MODE, XdpMode::Native),
            (XDP_FLAGS_SKB_MODE, XdpMode::Generic),
        ],
    };
    let mut last_err = None;
    for &(mode_flag, mode) in modes {
        let mut attrs = vec![LinkXdp::Fd(prog.as_fd().as_raw_fd())];
        match &replace {
            Some((old, _)) => {
                attrs.push(LinkXdp::Flags(mode_flag | XDP_FLAGS_REPLACE));
                attrs.push(LinkXdp::ExpectedFd(fd_u32(old)));
            }
            None => attrs.push(LinkXdp::Flags(mode_flag | XDP_FLAGS_UPDATE_IF_NOEXIST)),
        }
        let msg = LinkUnspec::new_with_index(ifindex)
            .append_extra_attribute(LinkAttribute::Xdp(attrs))
            .build();
        match handle.link().set(msg).execute().await {
            Ok(()) => return Ok(mode),
            Err(e) => {
                tracing::debug!(interface, ?mode, error = %e, "XDP attach attempt failed");
                last_err = Some(e);
            }
        }
    }
    Err(AttachError::XdpAttach {
        interface: interface.to_owned(),
        source: last_err.unwrap_or(rtnetlink::Error::RequestFailed),
    })
}

fn fd_u32(fd: &ProgramFd) -> u32 {
    // File descriptors are non-negative, so the conversion cannot fail.
    u32::try_from(fd.as_fd().as_raw_fd()).unwrap_or(u32::MAX)
}

/// Removes our XDP program from `a.interface`, only if it is still the one
/// we found (so a concurrent `up` that replaced it is left alone).
///
/// # Errors
/// When netlink refuses.
pub async fn detach_xdp(handle: &Handle, a: &Attachment) -> Result<(), AttachError> {
    let now = find(handle).await?;
    if !now
        .edge
        .iter()
        .any(|e| e.ifindex == a.ifindex && e.program_id == a.program_id)
    {
        tracing::info!(
            interface = a.interface,
            "edge program already removed or replaced"
        );
        return Ok(());
    }
    let Some(info) = program_info(a.program_id)? else {
        return Ok(());
    };
    let fd = info.fd().map_err(|source| AttachError::ProgramInfo {
        id: a.program_id,
        source,
    })?;
    let mode = if a.mode == "generic" {
        XDP_FLAGS_SKB_MODE
    } else {
        XDP_FLAGS_DRV_MODE
    };
    let attrs = vec![
        LinkXdp::Fd(-1),
        LinkXdp::ExpectedFd(fd_u32(&fd)),
        LinkXdp::Flags(mode | XDP_FLAGS_REPLACE),
    ];
    let msg = LinkUnspec::new_with_index(a.ifindex)
        .append_extra_attribute(LinkAttribute::Xdp(attrs))
        .build();
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(|source| AttachError::Netlink {
            interface: a.interface.clone(),
            source,
        })
}

/// Attaches a classifier to `interface` (ingress or egress) as a clsact
/// filter with our fixed priority and handle, replacing our earlier one in
/// place when `replace`.
///
/// # Errors
/// When the qdisc or the filter cannot be set up.
pub fn attach_tc(
    prog: &mut SchedClassifier,
    interface: &str,
    direction: TcAttachType,
    replace: bool,
) -> Result<(), AttachError> {
    let tc_err = |source| AttachError::Tc {
        interface: interface.to_owned(),
        source,
    };
    if let Err(e) = tc::qdisc_add_clsact(interface) {
        // EEXIST: the qdisc is already there, which is what we want.
        tracing::debug!(interface, error = %e, "clsact qdisc not added (probably present)");
    }
    let id = if replace {
        let link =
            SchedClassifierLink::attached(interface, direction, TC_PRIORITY, TC_HANDLE, None)
                .map_err(|e| tc_err(aya::programs::ProgramError::IOError(e)))?;
        prog.attach_to_link(link).map_err(tc_err)?
    } else {
        prog.attach_with_options(
            interface,
            direction,
            TcAttachOptions::Netlink(NlOptions {
                priority: TC_PRIORITY,
                handle: TC_HANDLE,
                classid: None,
            }),
        )
        .map_err(tc_err)?
    };
    // The filter must outlive this process; dropping the link would detach it.
    std::mem::forget(prog.take_link(id).map_err(tc_err)?);
    Ok(())
}

/// A file descriptor of the loaded program `id`, which keeps it loaded
/// while held, attached or not: what a confirmation's watchdog holds of
/// the programs an `up --confirm` replaces, to put them back.
///
/// # Errors
/// When the program is gone or cannot be opened.
pub fn hold(id: u32) -> Result<ProgramFd, AttachError> {
    let info = program_info(id)?.ok_or(AttachError::ProgramInfo {
        id,
        source: aya::programs::ProgramError::from(std::io::Error::from_raw_os_error(libc::ENOENT)),
    })?;
    info.fd()
        .map_err(|source| AttachError::ProgramInfo { id, source })
}

/// [`attach_tc`] for a program held by its file descriptor (see [`hold`])
/// rather than loaded by this process: the same clsact filter, priority
/// and handle, replacing ours in place when `replace`. aya attaches only
/// the programs it loaded, so this is the request it sends, through
/// rtnetlink.
///
/// # Errors
/// When the qdisc or the filter cannot be set up.
pub async fn attach_tc_fd(
    handle: &Handle,
    a: &Attachment,
    prog: &ProgramFd,
    direction: TcAttachType,
    replace: bool,
) -> Result<(), AttachError> {
    use netlink_packet_route::{
        AddressFamily, RouteNetlinkMessage,
        tc::{TcBpfFlags, TcHandle as NlHandle, TcHeader, TcMessage},
    };
    use rtnetlink::packet_core::{
        NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage,
    };
    let netlink_err = |source| AttachError::Netlink {
        interface: a.interface.clone(),
        source,
    };
    if let Err(e) = tc::qdisc_add_clsact(&a.interface) {
        tracing::debug!(interface = a.interface, error = %e, "clsact qdisc not added (probably present)");
    }
    let minor = if direction == TcAttachType::Ingress {
        NlHandle::MIN_INGRESS
    } else {
        NlHandle::MIN_EGRESS
    };
    let mut message = TcMessage::default();
    message.header = TcHeader::default();
    message.header.family = AddressFamily::Unspec;
    message.header.index = i32::try_from(a.ifindex).unwrap_or(i32::MAX);
    message.header.handle = NlHandle {
        major: 0,
        minor: TC_HANDLE_MINOR,
    };
    message.header.parent = NlHandle {
        major: 0xffff,
        minor,
    };
    // Priority in the upper half, the protocol (ETH_P_ALL, big-endian) in
    // the lower, as `tc` and aya send it.
    message.header.info = (u32::from(TC_PRIORITY) << 16)
        | u32::from(u16::try_from(libc::ETH_P_ALL).unwrap_or(3).to_be());
    message.attributes = vec![
        TcAttribute::Kind("bpf".to_owned()),
        TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgFd(fd_u32(prog))),
            TcOption::Bpf(TcFilterBpfOption::ProgName(a.program.clone())),
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
        ]),
    ];
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewTrafficFilter(message));
    // cls_bpf replaces a filter in place when neither flag is set.
    request.header.flags = NLM_F_REQUEST
        | NLM_F_ACK
        | if replace {
            0
        } else {
            NLM_F_CREATE | NLM_F_EXCL
        };
    let mut handle = handle.clone();
    let mut replies = handle.request(request).map_err(netlink_err)?;
    while let Some(reply) = futures_util::StreamExt::next(&mut replies).await {
        if let rtnetlink::packet_core::NetlinkPayload::Error(e) = reply.payload
            && e.code.is_some()
        {
            return Err(netlink_err(rtnetlink::Error::NetlinkError(e)));
        }
    }
    Ok(())
}

/// Removes our classifier `name` from `interface`.
///
/// # Errors
/// When netlink refuses.
pub fn detach_tc(interface: &str, direction: TcAttachType, name: &str) -> Result<(), AttachError> {
    tc::qdisc_detach_program(interface, direction, name).map_err(|e| AttachError::Tc {
        interface: interface.to_owned(),
        source: aya::programs::ProgramError::from(e),
    })
}

#[cfg(test)]
mod tests {
    use aya::{programs::ProgramError, sys::SyscallError};

    use super::vanished;

    fn failed(errno: i32) -> ProgramError {
        ProgramError::SyscallError(SyscallError {
            call: "bpf_prog_get_fd_by_id",
            io_error: std::io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn only_a_program_unloaded_during_the_walk_is_skipped() {
        assert!(vanished(&failed(libc::ENOENT)));
        // Anything else (no privilege, say) is a real failure of the walk,
        // not a program that went away.
        assert!(!vanished(&failed(libc::EPERM)));
        assert!(!vanished(&failed(libc::EINVAL)));
    }
}
