//! `[[tunnel.group]]`: named sets of peers that share grants.
//!
//! ```toml
//! [[tunnel.group]]
//! name = "db-clients"
//! peers = ["app-1", "app-2"]
//! allow = ["tcp/5432", "icmp"]
//! ```
//!
//! A group's members get its grants on top of their own
//! ([`crate::grants::merge`]); the kernel never sees the group.

use std::collections::HashMap;

use serde::Deserialize;

use super::{ConfigError, is_name, not_a_name, validator::Validator};
use crate::policy::{Group, Peer};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    name: Option<String>,
    peers: Option<Vec<String>>,
    allow: Option<Vec<String>>,
}

/// Whether `name` may name a group: what may name a peer (`ztxdp allow
/// @NAME` and audit records show it as they show peer names).
#[must_use]
pub fn is_group_name(name: &str) -> bool {
    is_name(name)
}

/// Why `name` is no group name, for messages.
#[must_use]
pub fn bad_group_name(name: &str) -> String {
    not_a_name("group", name)
}

impl Validator<'_> {
    /// The groups, each naming peers of `peers`.
    pub(super) fn groups(
        &self,
        raw: Vec<RawGroup>,
        peers: &[Peer],
    ) -> Result<Vec<Group>, ConfigError> {
        let by_name: HashMap<&str, usize> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), i))
            .collect();
        let mut seen: HashMap<String, usize> = HashMap::with_capacity(raw.len());
        let mut out = Vec::with_capacity(raw.len());
        for (index, group) in raw.into_iter().enumerate() {
            let group = self.group(group, index, &by_name)?;
            if let Some(first) = seen.insert(group.name.clone(), index) {
                return Err(self.at.invalid(
                    &format!("tunnel.group[{index}].name"),
                    format!(
                        "group name \"{}\" is already used by tunnel.group[{first}]",
                        group.name
                    ),
                ));
            }
            out.push(group);
        }
        Ok(out)
    }

    fn group(
        &self,
        raw: RawGroup,
        index: usize,
        peers: &HashMap<&str, usize>,
    ) -> Result<Group, ConfigError> {
        let at = format!("tunnel.group[{index}]");
        let name = self.required(
            raw.name,
            &format!("{at}.name"),
            "a unique group name, e.g. \"db-clients\"",
        )?;
        if !is_group_name(&name) {
            return Err(self
                .at
                .invalid(&format!("{at}.name"), bad_group_name(&name)));
        }
        let key = format!("{at}.peers");
        let names = self.required(
            raw.peers,
            &key,
            "the names of its peers, e.g. [\"app-1\", \"app-2\"]",
        )?;
        if names.is_empty() {
            return Err(self.at.invalid(
                &key,
                "empty; a group needs at least one peer (a [[tunnel.peer]] name)",
            ));
        }
        let mut members = Vec::with_capacity(names.len());
        let mut listed: HashMap<usize, usize> = HashMap::with_capacity(names.len());
        for (i, member) in names.iter().enumerate() {
            let Some(&peer) = peers.get(member.as_str()) else {
                let shown: String = member.chars().take(40).collect();
                return Err(self.at.invalid(
                    &format!("{key}[{i}]"),
                    format!(
                        "no peer is named {shown:?}; a group lists names of [[tunnel.peer]] tables"
                    ),
                ));
            };
            if let Some(first) = listed.insert(peer, i) {
                return Err(self.at.invalid(
                    &format!("{key}[{i}]"),
                    format!("\"{member}\" is listed twice (also {key}[{first}])"),
                ));
            }
            members.push(peer);
        }
        let grants = self.grants(&at, &raw.allow.unwrap_or_default())?;
        Ok(Group {
            name,
            members,
            grants,
        })
    }
}
