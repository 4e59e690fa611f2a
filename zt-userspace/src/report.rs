//! How a failure is told to the user: an error and its causes on one line,
//! each cause once, and whether the failure was the kernel or the file
//! system refusing a process that lacks the privileges ztxdp needs.
//!
//! A refusal is recognised by its error number (`EPERM` or `EACCES` from
//! the bpf syscall, netlink, a socket or a file), found anywhere in the
//! error's chain of causes, never by its text.

use std::{error::Error, io};

/// Capabilities the commands that touch the kernel need when not run as
/// root: `CAP_BPF` to load programs and create maps, `CAP_NET_ADMIN` to attach
/// them, and `CAP_SYS_ADMIN` because the kernel walks the loaded programs and
/// opens programs and maps by id (how every command finds the running
/// policy) only for it. Names and bit numbers from `linux/capability.h`.
pub const NEEDED_CAPABILITIES: [(&str, u32); 3] = [
    ("CAP_BPF", 39),
    ("CAP_NET_ADMIN", 12),
    ("CAP_SYS_ADMIN", 21),
];

/// The error and its causes on one line, `a: b: c`. A cause whose text its
/// parent already holds (a parent written as `"...: {source}"` that also
/// names it as its source, as aya's and many of ours do) is left out, so
/// no text is printed twice.
#[must_use]
pub fn chain(e: &dyn Error) -> String {
    let mut out = e.to_string();
    let mut parent = out.clone();
    for cause in std::iter::successors(e.source(), |&c| c.source()) {
        let text = cause.to_string();
        if !parent.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        parent = text;
    }
    out
}

/// Whether `e` or one of its causes is a refusal: `EPERM` or `EACCES` from
/// a system call (an [`io::Error`], which aya's syscall and netlink errors
/// carry as their source) or in a netlink answer.
#[must_use]
pub fn refused(e: &(dyn Error + 'static)) -> bool {
    std::iter::successors(Some(e), |&c| c.source()).any(|cause| {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            return refused_io(io);
        }
        if let Some(rtnetlink::Error::NetlinkError(message)) =
            cause.downcast_ref::<rtnetlink::Error>()
        {
            return refused_io(&message.to_io());
        }
        false
    })
}

/// Whether a system call failed with `EPERM` or `EACCES`.
#[must_use]
pub fn refused_io(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES))
}

/// What this process runs with, as far as ztxdp's needs go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Privileges {
    /// The effective user id: 0 owns ztxdp's files and sockets.
    pub uid: u32,
    /// The effective capability set, bit `n` for capability `n`.
    pub capabilities: u64,
}

impl Privileges {
    /// This process's, from `/proc/self/status`; `None` if it cannot be
    /// read (then nothing can be said about what is missing).
    #[must_use]
    pub fn current() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/self/status").ok()?)
    }

    /// From the text of `/proc/PID/status` (`Uid:` real, effective, ...;
    /// `CapEff:` in hex).
    #[must_use]
    pub fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::trim)
        };
        let uid = field("Uid:")?.split_whitespace().nth(1)?.parse().ok()?;
        let capabilities = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
        Some(Self { uid, capabilities })
    }

    /// The capabilities of [`NEEDED_CAPABILITIES`] this process lacks.
    #[must_use]
    pub fn missing(&self) -> Vec<&'static str> {
        NEEDED_CAPABILITIES
            .iter()
            .filter(|(_, bit)| self.capabilities & (1 << bit) == 0)
            .map(|(name, _)| *name)
            .collect()
    }

    /// Whether this process has everything ztxdp needs: root's user id
    /// (which owns ztxdp's files and sockets) and the capabilities. A
    /// refusal of such a process is not for lack of privileges.
    #[must_use]
    pub fn complete(&self) -> bool {
        self.uid == 0 && self.missing().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot lock {path}: {source}")]
    struct Echoing {
        path: &'static str,
        #[source]
        source: io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("ztxdp allow")]
    struct Context {
        #[source]
        source: Echoing,
    }

    #[test]
    fn a_cause_its_parent_already_printed_is_printed_once() {
        let e = Context {
            source: Echoing {
                path: "/var/lib/ztxdp/grants.json.lock",
                source: io::Error::from_raw_os_error(libc::EACCES),
            },
        };
        let text = chain(&e);
        assert_eq!(
            text,
            format!(
                "ztxdp allow: cannot lock /var/lib/ztxdp/grants.json.lock: {}",
                io::Error::from_raw_os_error(libc::EACCES)
            )
        );
    }

    #[test]
    fn eperm_and_eacces_anywhere_in_the_chain_are_refusals_other_errors_not() {
        let wrap = |errno| Context {
            source: Echoing {
                path: "/x",
                source: io::Error::from_raw_os_error(errno),
            },
        };
        assert!(refused(&wrap(libc::EPERM)));
        assert!(refused(&wrap(libc::EACCES)));
        assert!(!refused(&wrap(libc::ENOENT)));
        let netlink = |errno: i32| {
            let mut message = rtnetlink::packet_core::ErrorMessage::default();
            message.code = std::num::NonZeroI32::new(-errno);
            rtnetlink::Error::NetlinkError(message)
        };
        assert!(refused(&netlink(libc::EPERM)));
        assert!(!refused(&netlink(libc::EBUSY)));
    }

    #[test]
    fn privileges_are_read_from_proc_status() {
        let nobody = "Name:\tztxdp\nUid:\t65534\t65534\t65534\t65534\nCapEff:\t0000000000000000\n";
        let p = Privileges::parse(nobody).expect("parses");
        assert_eq!(p.uid, 65534);
        assert_eq!(p.missing(), ["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]);
        assert!(!p.complete());
        // Root without CAP_SYS_RESOURCE (as on the CI machine) has all it needs.
        let root = "Uid:\t0\t0\t0\t0\nCapEff:\t000001fffeffffff\n";
        let p = Privileges::parse(root).expect("parses");
        assert!(p.complete(), "{:?}", p.missing());
        // CAP_BPF and CAP_NET_ADMIN alone cannot find the running programs.
        let some = format!(
            "Uid:\t0\t0\t0\t0\nCapEff:\t{:016x}\n",
            (1u64 << 39) | (1 << 12)
        );
        let p = Privileges::parse(&some).expect("parses");
        assert_eq!(p.missing(), ["CAP_SYS_ADMIN"]);
    }
}
