//! The edge's service sources as the kernel looks them up: exact lookups
//! whose cost does not grow with the lists (`zt_common::map::SOURCES_V4_16`
//! says how they combine), expanded here from the prefixes the config
//! lists, read back, narrowed for a reload, and written as differences.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    ops::RangeInclusive,
};

use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, Map};
use ipnet::IpNet;
use zt_common::{
    SOURCE_DEEPER_24, SOURCE_DEEPER_32, SOURCE_V6_USE_TRIE, Source6Key, Source6Lengths,
    SourceBlock, capacity, map,
};

use super::{
    LpmParts, Tables, TablesError, batch, both_masks, contains, inherited, map_err, net, sync_trie,
};

/// The sources of every service, by the map that holds them, and where
/// the program looks for them. Each map's entries carry only their own
/// prefixes' bits (no longest match to serve), except the IPv6 trie's,
/// which is the fallback. Where it looks (`deeper`, `lengths`) follows
/// from the entries in a policy's contents ([`Self::of`]); read back, it
/// is what the kernel holds, so a lookup cleared behind ztxdp's back
/// differs, and a reload writes it again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    /// `map::SOURCES_V4_16`'s services by block (an address's top 16
    /// bits), nonzero only.
    pub(crate) v4_blocks: BTreeMap<u32, u64>,
    /// `map::SOURCES_V4_16`'s `deeper` bits by block, nonzero only: the
    /// longer-prefix maps the program looks in for an address of it.
    pub(crate) deeper: BTreeMap<u32, u32>,
    /// `map::SOURCES_V4_24`, by /24 (last byte zero).
    pub(crate) v4_24: BTreeMap<[u8; 4], u64>,
    /// `map::SOURCES_V4_32`, by address.
    pub(crate) v4_32: BTreeMap<[u8; 4], u64>,
    /// `map::SOURCES_V6`, when the lengths in use fit.
    pub(crate) v6: BTreeMap<Source6Key, u64>,
    /// `map::SERVICE_SOURCES_V6` (masks inherited along the trie), when
    /// they do not; then `v6` is empty.
    pub(crate) v6_trie: BTreeMap<LpmParts<16>, u64>,
    /// `map::SOURCE_V6_LENGTHS`: the lengths the program looks up in
    /// `map::SOURCES_V6`, or that it asks the trie.
    pub(crate) lengths: Source6Lengths,
}

/// More entries than a map holds.
fn check(what: &'static str, n: u64) -> Result<(), TablesError> {
    if n > u64::from(capacity::SERVICE_SOURCES) {
        return Err(TablesError::TooMany {
            what,
            count: usize::try_from(n).unwrap_or(usize::MAX),
            limit: capacity::SERVICE_SOURCES,
        });
    }
    Ok(())
}

/// The block of `map::SOURCES_V4_16` that holds address `a`: its top 16
/// bits.
fn block(a: [u8; 4]) -> u32 {
    u32::from(a[0]) << 8 | u32::from(a[1])
}

/// How many entries of the map keyed by /`key_len` the IPv4 prefixes of
/// `lens` (the lengths that map holds) expand to, overlaps counted once:
/// merged first, so the prefixes are disjoint and each a whole number of
/// keys. Counted before expanding, so a list far past the map costs no
/// memory, and the error gives the whole list's count.
fn expanded(v4: &BTreeMap<LpmParts<4>, u64>, lens: RangeInclusive<u32>, key_len: u32) -> u64 {
    let nets: Vec<IpNet> = v4
        .keys()
        .filter(|(_, len)| lens.contains(len))
        .filter_map(net)
        .collect();
    IpNet::aggregate(&nets)
        .iter()
        .map(|n| 1u64 << (key_len - u32::from(n.prefix_len()).min(key_len)))
        .sum()
}

impl Sources {
    /// The maps for the prefixes `v4` and `v6`, each with the services
    /// (bits) that list it. A prefix is expanded to the entries of its
    /// map: a /12 to 16 blocks, a /20 to 16 /24s, a /28 to 16 addresses.
    ///
    /// # Errors
    /// When a map would hold more than `capacity::SERVICE_SOURCES` entries.
    pub(crate) fn of(
        v4: &BTreeMap<LpmParts<4>, u64>,
        v6: &BTreeMap<LpmParts<16>, u64>,
    ) -> Result<Self, TablesError> {
        check(
            "edge service sources (IPv4 /17 to /24, as /24s)",
            expanded(v4, 17..=24, 24),
        )?;
        check(
            "edge service sources (IPv4 /25 to /32, as addresses)",
            expanded(v4, 25..=32, 32),
        )?;
        let mut s = Self::default();
        for (&(addr, len), &mask) in v4 {
            let base = u32::from_be_bytes(addr);
            let (first, count) = match len {
                0..=16 => (base >> 16, 1u32 << (16 - len)),
                17..=24 => (base >> 8, 1u32 << (24 - len)),
                _ => (base, 1u32 << (32 - len.min(32))),
            };
            for i in 0..count {
                let at = first + i;
                match len {
                    0..=16 => *s.v4_blocks.entry(at).or_default() |= mask,
                    17..=24 => *s.v4_24.entry((at << 8).to_be_bytes()).or_default() |= mask,
                    _ => *s.v4_32.entry(at.to_be_bytes()).or_default() |= mask,
                }
            }
        }
        check(
            "edge service sources (IPv6)",
            u64::try_from(v6.len()).unwrap_or(u64::MAX),
        )?;
        let lengths: BTreeSet<u32> = v6.keys().map(|(_, len)| *len).collect();
        if lengths.len() > capacity::SOURCE_V6_LENGTHS as usize {
            s.v6_trie = inherited(v6);
        } else {
            for (&(addr, len), &mask) in v6 {
                let key = Source6Key {
                    prefix_len: len,
                    addr: zt_common::v6_network(addr, len),
                };
                *s.v6.entry(key).or_default() |= mask;
            }
        }
        Ok(s.looked_up())
    }

    /// What both `self` and `new` admit: each entry with the bits both
    /// give it. An address's services are the union over its entries, so
    /// a union of intersections admits nothing either side does not.
    pub(crate) fn narrowed(&self, new: &Self) -> Self {
        Self {
            v4_blocks: both_masks(&self.v4_blocks, &new.v4_blocks),
            v4_24: both_masks(&self.v4_24, &new.v4_24),
            v4_32: both_masks(&self.v4_32, &new.v4_32),
            v6: both_masks(&self.v6, &new.v6),
            v6_trie: both_masks(&self.v6_trie, &new.v6_trie),
            ..Self::default()
        }
        .looked_up()
    }

    /// `self` with `deeper` and `lengths` set to look where its entries
    /// are, and nowhere else.
    fn looked_up(mut self) -> Self {
        self.deeper.clear();
        for (keys, bit) in [
            (&self.v4_24, SOURCE_DEEPER_24),
            (&self.v4_32, SOURCE_DEEPER_32),
        ] {
            for a in keys.keys() {
                *self.deeper.entry(block(*a)).or_default() |= bit;
            }
        }
        self.lengths = Source6Lengths::default();
        if self.v6_in_trie() {
            self.lengths.count = SOURCE_V6_USE_TRIE;
        } else {
            let lengths: BTreeSet<u32> = self.v6.keys().map(|k| k.prefix_len).collect();
            for (slot, len) in self.lengths.lengths.iter_mut().zip(&lengths) {
                *slot = u8::try_from(*len).unwrap_or(u8::MAX);
                self.lengths.count += 1;
            }
        }
        self
    }

    /// Only the entries the program looks up: a /24 or an address whose
    /// block's `deeper` bits do not send the lookup to its map, an IPv6
    /// prefix of a length the lengths leave out, the hash when they say
    /// the trie (or the trie when they do not) admit no one. A policy's
    /// own sources are all looked up; the kernel's, read back, may not be.
    #[must_use]
    pub(crate) fn looked_up_entries(&self) -> Self {
        fn kept<K: Ord + Copy>(
            m: &BTreeMap<K, u64>,
            keep: impl Fn(&K) -> bool,
        ) -> BTreeMap<K, u64> {
            m.iter()
                .filter(|(k, _)| keep(k))
                .map(|(k, v)| (*k, *v))
                .collect()
        }
        let deeper =
            |a: &[u8; 4], bit: u32| self.deeper.get(&block(*a)).is_some_and(|d| d & bit != 0);
        let (trie, lengths) = self.v6_lookups();
        Self {
            v4_blocks: self.v4_blocks.clone(),
            v4_24: kept(&self.v4_24, |a| deeper(a, SOURCE_DEEPER_24)),
            v4_32: kept(&self.v4_32, |a| deeper(a, SOURCE_DEEPER_32)),
            v6: kept(&self.v6, |k| {
                !trie && u8::try_from(k.prefix_len).is_ok_and(|l| lengths.contains(&l))
            }),
            v6_trie: if trie {
                self.v6_trie.clone()
            } else {
                BTreeMap::new()
            },
            deeper: self.deeper.clone(),
            lengths: self.lengths,
        }
    }

    /// The services `addr` may reach, as the edge program computes them:
    /// the union of the entries holding it, where the program looks.
    pub(crate) fn services_of(&self, addr: IpAddr) -> u64 {
        match addr {
            IpAddr::V4(a) => {
                let a = a.octets();
                let at = block(a);
                let deeper = self.deeper.get(&at).copied().unwrap_or(0);
                let mut mask = self.v4_blocks.get(&at).copied().unwrap_or(0);
                if deeper & SOURCE_DEEPER_24 != 0 {
                    mask |= self.v4_24.get(&[a[0], a[1], a[2], 0]).copied().unwrap_or(0);
                }
                if deeper & SOURCE_DEEPER_32 != 0 {
                    mask |= self.v4_32.get(&a).copied().unwrap_or(0);
                }
                mask
            }
            IpAddr::V6(a) => {
                let (trie, lengths) = self.v6_lookups();
                if trie {
                    // The trie's masks are inherited: the longest match has
                    // every shorter one's.
                    return self
                        .v6_trie
                        .iter()
                        .filter(|(k, _)| contains(k, &(a.octets(), 128)))
                        .max_by_key(|((_, len), _)| *len)
                        .map_or(0, |(_, m)| *m);
                }
                lengths
                    .iter()
                    .map(|&len| {
                        let key = Source6Key {
                            prefix_len: u32::from(len),
                            addr: zt_common::v6_network(a.octets(), u32::from(len)),
                        };
                        self.v6.get(&key).copied().unwrap_or(0)
                    })
                    .fold(0, |all, m| all | m)
            }
        }
    }

    /// Whether the IPv6 sources are in the trie.
    #[must_use]
    pub fn v6_in_trie(&self) -> bool {
        !self.v6_trie.is_empty()
    }

    /// Every entry as a prefix with its services: blocks as /16s, the
    /// rest as their keys say. What an address may reach is the union of
    /// the entries holding it (the trie's masks already are).
    pub(crate) fn v4_prefixes(&self) -> BTreeMap<LpmParts<4>, u64> {
        let blocks = self.v4_blocks.iter().map(|(&at, &m)| {
            let a = (at << 16).to_be_bytes();
            ((a, 16), m)
        });
        let by24 = self.v4_24.iter().map(|(&a, &m)| ((a, 24), m));
        let by32 = self.v4_32.iter().map(|(&a, &m)| ((a, 32), m));
        blocks.chain(by24).chain(by32).collect()
    }

    /// As [`Self::v4_prefixes`], for IPv6.
    pub(crate) fn v6_prefixes(&self) -> BTreeMap<LpmParts<16>, u64> {
        self.v6
            .iter()
            .map(|(k, &m)| ((k.addr, k.prefix_len), m))
            .chain(self.v6_trie.iter().map(|(&k, &m)| (k, m)))
            .collect()
    }

    /// Each block's entry of `map::SOURCES_V4_16`; blocks with nothing
    /// are absent (zero in the map).
    pub(crate) fn blocks(&self) -> BTreeMap<u32, SourceBlock> {
        let mut out: BTreeMap<u32, SourceBlock> = BTreeMap::new();
        for (&at, &services) in &self.v4_blocks {
            out.entry(at).or_default().services = services;
        }
        for (&at, &deeper) in &self.deeper {
            out.entry(at).or_default().deeper = deeper;
        }
        out
    }

    /// Where the program looks for IPv6 sources: in the trie (`true`), or
    /// in `map::SOURCES_V6` at these lengths. A count past the array (which
    /// only a write behind ztxdp's back makes) reads as the whole array.
    pub(crate) fn v6_lookups(&self) -> (bool, BTreeSet<u8>) {
        let l = &self.lengths;
        if l.count == SOURCE_V6_USE_TRIE {
            return (true, BTreeSet::new());
        }
        let n = usize::try_from(l.count).unwrap_or(usize::MAX);
        (false, l.lengths.iter().take(n).copied().collect())
    }
}

impl Tables {
    /// What the source maps hold.
    ///
    /// # Errors
    /// When a map cannot be read.
    pub(crate) fn read_sources(&self) -> Result<Sources, TablesError> {
        let mut s = Sources::default();
        if self.maps.contains_key(map::SOURCES_V4_16) {
            let blocks: Vec<(u32, SourceBlock)> =
                self.mapped::<SourceBlock, _>(map::SOURCES_V4_16, |blocks, n| {
                    (0..n)
                        .filter_map(|at| {
                            // SAFETY: inside the mapping (at < n), aligned
                            // (page-aligned, 16-byte values).
                            let block = unsafe { blocks.add(at).read_volatile() };
                            let at = u32::try_from(at).ok()?;
                            (block != SourceBlock::default()).then_some((at, block))
                        })
                        .collect()
                })?;
            for (at, block) in blocks {
                if block.services != 0 {
                    s.v4_blocks.insert(at, block.services);
                }
                if block.deeper != 0 {
                    s.deeper.insert(at, block.deeper);
                }
            }
        }
        if let Some(m) = self.maps.get(map::SOURCE_V6_LENGTHS) {
            s.lengths = Array::<_, Source6Lengths>::try_from(m)
                .map_err(map_err(map::SOURCE_V6_LENGTHS))?
                .get(&0, 0)
                .map_err(map_err(map::SOURCE_V6_LENGTHS))?;
        }
        s.v4_24 = read_hash(self.maps.get(map::SOURCES_V4_24), map::SOURCES_V4_24)?;
        s.v4_32 = read_hash(self.maps.get(map::SOURCES_V4_32), map::SOURCES_V4_32)?;
        s.v6 = read_hash(self.maps.get(map::SOURCES_V6), map::SOURCES_V6)?;
        if let Some(m) = self.maps.get(map::SERVICE_SOURCES_V6) {
            s.v6_trie = LpmTrie::<_, [u8; 16], u64>::try_from(m)
                .map_err(map_err(map::SERVICE_SOURCES_V6))?
                .iter()
                .map(|kv| kv.map(|(k, v)| ((k.data(), k.prefix_len()), v)))
                .collect::<Result<_, _>>()
                .map_err(map_err(map::SERVICE_SOURCES_V6))?;
        }
        Ok(s)
    }

    /// Makes the source maps go from `from` to `to`. The entries first,
    /// then the blocks' `deeper` bits and the IPv6 lengths, which say
    /// where the program looks: a change that adds entries makes them
    /// visible only once they are all there, and one that removes entries
    /// (a reload's first half) keeps looking where the remaining ones are.
    ///
    /// # Errors
    /// When a map cannot be written.
    pub(crate) fn write_sources(
        &mut self,
        from: &Sources,
        to: &Sources,
    ) -> Result<(), TablesError> {
        if from == to {
            return Ok(());
        }
        if from.v4_24 != to.v4_24 {
            sync_hash(
                self.get(map::SOURCES_V4_24)?,
                map::SOURCES_V4_24,
                &from.v4_24,
                &to.v4_24,
            )?;
        }
        if from.v4_32 != to.v4_32 {
            sync_hash(
                self.get(map::SOURCES_V4_32)?,
                map::SOURCES_V4_32,
                &from.v4_32,
                &to.v4_32,
            )?;
        }
        if from.v6 != to.v6 {
            sync_hash(
                self.get(map::SOURCES_V6)?,
                map::SOURCES_V6,
                &from.v6,
                &to.v6,
            )?;
        }
        if from.v6_trie != to.v6_trie {
            sync_trie::<16, u64>(
                self.get(map::SERVICE_SOURCES_V6)?,
                map::SERVICE_SOURCES_V6,
                &from.v6_trie,
                &to.v6_trie,
            )?;
        }
        let (old, new) = (from.blocks(), to.blocks());
        if old != new {
            let mut blocks: Array<_, SourceBlock> = Array::try_from(self.get(map::SOURCES_V4_16)?)
                .map_err(map_err(map::SOURCES_V4_16))?;
            let at: BTreeSet<u32> = old.keys().chain(new.keys()).copied().collect();
            for i in at {
                let want = new.get(&i).copied().unwrap_or_default();
                if old.get(&i).copied().unwrap_or_default() != want {
                    blocks
                        .set(i, want, 0)
                        .map_err(map_err(map::SOURCES_V4_16))?;
                }
            }
        }
        if from.lengths != to.lengths {
            let mut lengths: Array<_, Source6Lengths> =
                Array::try_from(self.get(map::SOURCE_V6_LENGTHS)?)
                    .map_err(map_err(map::SOURCE_V6_LENGTHS))?;
            lengths
                .set(0, to.lengths, 0)
                .map_err(map_err(map::SOURCE_V6_LENGTHS))?;
        }
        Ok(())
    }
}

/// A hash map's entries, or none when the programs do not use it.
pub(super) fn read_hash<K: aya::Pod + Ord, V: aya::Pod>(
    m: Option<&Map>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, TablesError> {
    let Some(m) = m else {
        return Ok(BTreeMap::new());
    };
    BpfHashMap::<_, K, V>::try_from(m)
        .map_err(map_err(name))?
        .iter()
        .collect::<Result<_, _>>()
        .map_err(map_err(name))
}

/// Makes a hash map go from `from` to `to`: removals, then what is new or
/// changed.
pub(super) fn sync_hash<K: aya::Pod + Ord, V: aya::Pod + PartialEq>(
    map: &mut Map,
    name: &'static str,
    from: &BTreeMap<K, V>,
    to: &BTreeMap<K, V>,
) -> Result<(), TablesError> {
    {
        let mut h: BpfHashMap<_, K, V> = BpfHashMap::try_from(&mut *map).map_err(map_err(name))?;
        for key in from.keys().filter(|k| !to.contains_key(k)) {
            h.remove(key).map_err(map_err(name))?;
        }
    }
    let (keys, values): (Vec<K>, Vec<V>) = to
        .iter()
        .filter(|(key, value)| from.get(key) != Some(value))
        .map(|(k, v)| (*k, *v))
        .unzip();
    if keys.len() >= batch::WORTH_IT
        && let Some(data) = batch::data(map)
    {
        return batch::update(data, &keys, &values)
            .map_err(|source| TablesError::Batch { name, source });
    }
    let mut h: BpfHashMap<_, K, V> = BpfHashMap::try_from(map).map_err(map_err(name))?;
    for (key, value) in keys.iter().zip(&values) {
        h.insert(key, value, 0).map_err(map_err(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
