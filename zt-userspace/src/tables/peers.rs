//! The peers' addresses as the kernel looks them up: a host address (/32,
//! /128, nearly every `WireGuard` peer's) in a hash, one exact lookup; a
//! shorter prefix in a trie, looked up only when the hash has nothing.
//! Above this module a peer's addresses are one set of prefixes per
//! family; the split happens only on the way to and from the kernel.

use std::collections::BTreeMap;

use aya::maps::{LpmTrie, lpm_trie::Key};
use zt_common::{PeerInfo, map};

use super::{
    LpmParts, Tables, TablesError, map_err,
    sources::{read_hash, sync_hash},
    sync_trie,
};

/// The maps of one family: its host hash and its prefix trie.
struct Family {
    hosts: &'static str,
    prefixes: &'static str,
}

const V4: Family = Family {
    hosts: map::PEER_HOSTS_V4,
    prefixes: map::PEER_V4,
};
const V6: Family = Family {
    hosts: map::PEER_HOSTS_V6,
    prefixes: map::PEER_V6,
};

/// `all` as the hash's host addresses and the trie's shorter prefixes.
type Split<const N: usize> = (BTreeMap<[u8; N], PeerInfo>, BTreeMap<LpmParts<N>, PeerInfo>);

fn split<const N: usize>(all: &BTreeMap<LpmParts<N>, PeerInfo>) -> Split<N> {
    let host = u32::try_from(N * 8).unwrap_or(u32::MAX);
    let mut hosts = BTreeMap::new();
    let mut prefixes = BTreeMap::new();
    for (&(addr, len), &info) in all {
        if len == host {
            hosts.insert(addr, info);
        } else {
            prefixes.insert((addr, len), info);
        }
    }
    (hosts, prefixes)
}

impl Tables {
    /// The peers' IPv4 and IPv6 prefixes, host addresses among them.
    ///
    /// # Errors
    /// When a map cannot be read.
    pub(crate) fn read_peers(&self) -> Result<PeerPrefixes, TablesError> {
        Ok((self.read_family::<4>(&V4)?, self.read_family::<16>(&V6)?))
    }

    fn read_family<const N: usize>(
        &self,
        family: &Family,
    ) -> Result<BTreeMap<LpmParts<N>, PeerInfo>, TablesError> {
        let host = u32::try_from(N * 8).unwrap_or(u32::MAX);
        let mut out: BTreeMap<LpmParts<N>, PeerInfo> =
            read_hash::<[u8; N], PeerInfo>(self.maps.get(family.hosts), family.hosts)?
                .into_iter()
                .map(|(addr, info)| ((addr, host), info))
                .collect();
        if let Some(m) = self.maps.get(family.prefixes) {
            let t =
                LpmTrie::<_, [u8; N], PeerInfo>::try_from(m).map_err(map_err(family.prefixes))?;
            for kv in &t {
                let (k, info) = kv.map_err(map_err(family.prefixes))?;
                out.insert((k.data(), k.prefix_len()), info);
            }
        }
        Ok(out)
    }

    /// Makes the peer maps go from `from` to `to` (IPv4, IPv6).
    ///
    /// # Errors
    /// When a map cannot be written.
    pub(crate) fn write_peers(
        &mut self,
        from: (
            &BTreeMap<LpmParts<4>, PeerInfo>,
            &BTreeMap<LpmParts<16>, PeerInfo>,
        ),
        to: (
            &BTreeMap<LpmParts<4>, PeerInfo>,
            &BTreeMap<LpmParts<16>, PeerInfo>,
        ),
    ) -> Result<(), TablesError> {
        self.write_family::<4>(&V4, from.0, to.0)?;
        self.write_family::<16>(&V6, from.1, to.1)
    }

    fn write_family<const N: usize>(
        &mut self,
        family: &Family,
        from: &BTreeMap<LpmParts<N>, PeerInfo>,
        to: &BTreeMap<LpmParts<N>, PeerInfo>,
    ) -> Result<(), TablesError> {
        if from == to {
            return Ok(());
        }
        let ((from_hosts, from_prefixes), (to_hosts, to_prefixes)) = (split(from), split(to));
        if from_hosts != to_hosts {
            sync_hash(
                self.get(family.hosts)?,
                family.hosts,
                &from_hosts,
                &to_hosts,
            )?;
        }
        if from_prefixes != to_prefixes {
            sync_trie::<N, PeerInfo>(
                self.get(family.prefixes)?,
                family.prefixes,
                &from_prefixes,
                &to_prefixes,
            )?;
        }
        Ok(())
    }

    /// Adds (or rewrites) the prefixes `v4` and `v6` as `info`'s.
    ///
    /// # Errors
    /// When a map cannot be written.
    pub(crate) fn insert_peer_prefixes(
        &mut self,
        info: PeerInfo,
        v4: &[LpmParts<4>],
        v6: &[LpmParts<16>],
    ) -> Result<(), TablesError> {
        self.insert_family::<4>(&V4, info, v4)?;
        self.insert_family::<16>(&V6, info, v6)
    }

    fn insert_family<const N: usize>(
        &mut self,
        family: &Family,
        info: PeerInfo,
        prefixes: &[LpmParts<N>],
    ) -> Result<(), TablesError> {
        let host = u32::try_from(N * 8).unwrap_or(u32::MAX);
        for &(addr, len) in prefixes {
            if len == host {
                let mut h: aya::maps::HashMap<_, [u8; N], PeerInfo> =
                    aya::maps::HashMap::try_from(self.get(family.hosts)?)
                        .map_err(map_err(family.hosts))?;
                h.insert(addr, info, 0).map_err(map_err(family.hosts))?;
            } else {
                let mut t: LpmTrie<_, [u8; N], PeerInfo> =
                    LpmTrie::try_from(self.get(family.prefixes)?)
                        .map_err(map_err(family.prefixes))?;
                t.insert(&Key::new(len, addr), info, 0)
                    .map_err(map_err(family.prefixes))?;
            }
        }
        Ok(())
    }
}

/// Every peer prefix, IPv4 then IPv6.
pub(crate) type PeerPrefixes = (
    BTreeMap<LpmParts<4>, PeerInfo>,
    BTreeMap<LpmParts<16>, PeerInfo>,
);
