//! A peer's grants merged from where they come from: the peer's own
//! (`tunnel.peer[].allow`), each of its groups' (`tunnel.group[].allow`),
//! and the runtime grants file's changes to the peer and to its groups.
//!
//! ```text
//! group g   = (config grants of g ∪ added to g) − revoked from g
//! peer  p   = (own grants of p ∪ added to p ∪ every group g of p) − revoked from p
//! ```
//!
//! So effective grants are a union: `revoke @g 5432` takes 5432 from the
//! group, and a member that also has it from its own grant or another
//! group keeps it. A revoke of the peer itself (`revoke app-1 5432`) is the
//! most specific rule and wins over every group, as it wins over the
//! peer's own config grants.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{GrantSet, PeerChanges, RuntimeGrants};
use crate::policy::{Group, TunnelPolicy};

/// Where a grant comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The peer's own `allow` in the config.
    Peer,
    /// A group's `allow` in the config.
    Group,
    /// The runtime grants file (`ztxdp allow`), for the peer or a group.
    Runtime,
}

/// What one source gives a peer, less what the runtime file revokes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub origin: Origin,
    /// The group, by index into [`TunnelPolicy::groups`], for a group's
    /// config grants and its runtime changes.
    pub group: Option<usize>,
    pub grants: GrantSet,
}

impl PeerChanges {
    /// The grants added and revoked, as sets. Entries that do not parse
    /// were refused when the file was loaded.
    fn sets(&self) -> (GrantSet, GrantSet) {
        let set = |list: &[String]| {
            GrantSet::of(
                &list
                    .iter()
                    .filter_map(|g| crate::config::parse_grant(g).ok())
                    .collect::<Vec<_>>(),
            )
        };
        (set(&self.added), set(&self.revoked))
    }
}

/// Each group's grants from the config and from the runtime file, each
/// less what the file revokes from the group.
fn group_sets(groups: &[Group], runtime: &RuntimeGrants) -> Vec<(GrantSet, GrantSet)> {
    groups
        .iter()
        .map(|g| {
            let (added, revoked) = runtime
                .groups
                .get(&g.name)
                .map(PeerChanges::sets)
                .unwrap_or_default();
            (
                GrantSet::of(&g.grants).difference(&revoked),
                added.difference(&revoked),
            )
        })
        .collect()
}

/// The groups of each of `peers` peers, by group index.
fn member_of(groups: &[Group], peers: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); peers];
    for (g, group) in groups.iter().enumerate() {
        for &m in &group.members {
            if let Some(of) = out.get_mut(m) {
                of.push(g);
            }
        }
    }
    out
}

/// Merges the grants of a config's peers with its groups and a runtime
/// grants file. Takes the config's policy, whose peers hold their own
/// grants, not one [`RuntimeGrants::apply`] returned.
pub struct Merger<'a> {
    tunnel: &'a TunnelPolicy,
    runtime: &'a RuntimeGrants,
    groups: Vec<(GrantSet, GrantSet)>,
    member_of: Vec<Vec<usize>>,
}

impl<'a> Merger<'a> {
    #[must_use]
    pub fn new(tunnel: &'a TunnelPolicy, runtime: &'a RuntimeGrants) -> Self {
        Self {
            tunnel,
            runtime,
            groups: group_sets(&tunnel.groups, runtime),
            member_of: member_of(&tunnel.groups, tunnel.peers.len()),
        }
    }

    /// The groups peer `index` is in, by index into
    /// [`TunnelPolicy::groups`].
    #[must_use]
    pub fn groups_of(&self, index: usize) -> &[usize] {
        self.member_of.get(index).map_or(&[], Vec::as_slice)
    }

    /// Whether peer `index` has only its config grants: it is in no group
    /// and the runtime file does not name it. Its grants then stay as the
    /// config writes them.
    #[must_use]
    pub fn untouched(&self, index: usize) -> bool {
        self.groups_of(index).is_empty()
            && self
                .tunnel
                .peers
                .get(index)
                .is_none_or(|p| !self.runtime.peers.contains_key(&p.name))
    }

    /// What each source gives peer `index`, sources that give nothing
    /// left out: the peer's own grants, its runtime additions, then each
    /// group's config grants and runtime additions, in file order.
    #[must_use]
    pub fn sources(&self, index: usize) -> Vec<Source> {
        let Some(peer) = self.tunnel.peers.get(index) else {
            return Vec::new();
        };
        let (added, revoked) = self
            .runtime
            .peers
            .get(&peer.name)
            .map(PeerChanges::sets)
            .unwrap_or_default();
        let source = |origin, group, grants: &GrantSet| Source {
            origin,
            group,
            grants: grants.difference(&revoked),
        };
        let mut out = vec![
            source(Origin::Peer, None, &GrantSet::of(&peer.grants)),
            source(Origin::Runtime, None, &added),
        ];
        for &g in self.groups_of(index) {
            let (config, runtime) = &self.groups[g];
            out.push(source(Origin::Group, Some(g), config));
            out.push(source(Origin::Runtime, Some(g), runtime));
        }
        out.retain(|s| !s.grants.is_empty());
        out
    }

    /// Peer `index`'s effective grants: every source together.
    #[must_use]
    pub fn effective(&self, index: usize) -> GrantSet {
        self.sources(index)
            .iter()
            .fold(GrantSet::default(), |all, s| all.union(&s.grants))
    }
}

/// Which groups grant what to each peer, for audit records: a decision
/// passed by a grant names the groups that grant it.
#[derive(Clone, Debug, Default)]
pub struct GroupGrants {
    /// Per group: its name and everything it grants.
    groups: Vec<(String, GrantSet)>,
    member_of: Vec<Vec<usize>>,
}

impl GroupGrants {
    /// The groups of a tunnel with `runtime`'s changes.
    #[must_use]
    pub fn of(tunnel: &TunnelPolicy, runtime: &RuntimeGrants) -> Self {
        Self::build(&tunnel.groups, tunnel.peers.len(), runtime)
    }

    /// `groups` of a tunnel of `peers` peers with `runtime`'s changes.
    fn build(groups: &[Group], peers: usize, runtime: &RuntimeGrants) -> Self {
        Self {
            groups: groups
                .iter()
                .zip(group_sets(groups, runtime))
                .map(|(g, (config, added))| (g.name.clone(), config.union(&added)))
                .collect(),
            member_of: member_of(groups, peers),
        }
    }

    /// The groups of peer `peer` that grant `port` of IP protocol
    /// `protocol`, or ICMP echo when `port` is `None`, in file order.
    #[must_use]
    pub fn granting(&self, peer: usize, protocol: u8, port: Option<u16>) -> Vec<String> {
        self.member_of.get(peer).map_or_else(Vec::new, |of| {
            of.iter()
                .filter_map(|&g| self.groups.get(g))
                .filter(|(_, set)| set.covers(protocol, port))
                .map(|(name, _)| name.clone())
                .collect()
        })
    }
}

/// What identifies one version of the runtime grants file: every save
/// renames a new file into place, so a new inode (or a new size or time,
/// for a file edited in place) is a new version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    /// `None` when there is no file (no runtime changes).
    fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// The daemon's [`GroupGrants`], kept up to date with the runtime grants
/// file that `ztxdp allow @group` changes from another process. Does
/// nothing for a tunnel without groups.
#[derive(Clone, Debug, Default)]
pub struct GroupWatch {
    /// The tunnel's groups; none: nothing to watch.
    groups: Vec<Group>,
    peers: usize,
    path: PathBuf,
    stamp: Option<Stamp>,
    grants: GroupGrants,
}

impl GroupWatch {
    /// Watches the runtime grants of `tunnel` (a config's tunnel policy,
    /// or one [`RuntimeGrants::apply`] returned: they have the same groups).
    #[must_use]
    pub fn new(tunnel: Option<&TunnelPolicy>) -> Self {
        let Some(t) = tunnel.filter(|t| !t.groups.is_empty()) else {
            return Self::default();
        };
        let mut watch = Self {
            groups: t.groups.clone(),
            peers: t.peers.len(),
            path: t.runtime_grants.clone(),
            stamp: None,
            grants: GroupGrants::default(),
        };
        watch.read();
        watch
    }

    /// Reads the runtime grants file again if it changed since it was
    /// last read: one `stat` when it did not.
    pub fn refresh(&mut self) {
        if !self.groups.is_empty() && Stamp::of(&self.path) != self.stamp {
            self.read();
        }
    }

    fn read(&mut self) {
        // Read without the grants lock: saves rename a whole file into
        // place, so this sees the old version or the new one.
        self.stamp = Stamp::of(&self.path);
        match RuntimeGrants::load(&self.path) {
            Ok(runtime) => self.grants = GroupGrants::build(&self.groups, self.peers, &runtime),
            Err(e) => tracing::warn!(
                error = %e,
                "cannot read the runtime grants; audit records name groups as they were before"
            ),
        }
    }

    /// See [`GroupGrants::granting`].
    #[must_use]
    pub fn granting(&self, peer: usize, protocol: u8, port: Option<u16>) -> Vec<String> {
        self.grants.granting(peer, protocol, port)
    }
}

#[cfg(test)]
mod tests;
