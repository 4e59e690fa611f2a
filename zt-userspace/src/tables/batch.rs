//! Many hash map updates or reads in one system call
//! (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_LOOKUP_BATCH`, hash maps since Linux
//! 5.6): filling a million source addresses one `BPF_MAP_UPDATE_ELEM` at a
//! time spends most of the load in system calls, and walking a million
//! flows one `BPF_MAP_GET_NEXT_KEY` and one lookup at a time takes seconds.
//! aya 0.14 has no batch operations.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::{Map, MapData};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries per call: large enough that the calls cost nothing next to the
/// updates, small enough that the kernel's copy of the keys and values
/// (`kvmalloc`) stays modest.
const CHUNK: usize = 16_384;

/// Below this many entries, single updates are as fast and simpler to
/// report on.
pub(super) const WORTH_IT: usize = 256;

/// The map's data, for the hash maps (LRU or not) this module reads and
/// writes.
pub(super) fn data(map: &Map) -> Option<&MapData> {
    match map {
        Map::HashMap(d) | Map::LruHashMap(d) => Some(d),
        _ => None,
    }
}

/// Inserts or replaces `keys[i]` with `values[i]` for every `i`.
///
/// # Errors
/// The first call the kernel refuses; the entries of the calls before it
/// (and part of that one) are in the map.
pub(super) fn update<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    debug_assert_eq!(keys.len(), values.len());
    let fd = u32::try_from(map.fd().as_fd().as_raw_fd()).map_err(io::Error::other)?;
    for (k, v) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        // SAFETY: all zeros is a valid bpf_attr (plain integers), and the
        // kernel requires the bytes past the command's fields to be zero.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.batch.map_fd = fd;
        attr.batch.keys = k.as_ptr().addr() as u64;
        attr.batch.values = v.as_ptr().addr() as u64;
        attr.batch.count = u32::try_from(k.len()).map_err(io::Error::other)?;
        // SAFETY: `keys` and `values` point at `count` keys and values of
        // the map's key and value sizes (aya checked them when the map was
        // typed), alive for the call; the kernel only reads them, and
        // writes `count` back into `attr`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_UPDATE_BATCH as libc::c_long,
                &raw mut attr,
                size_of::<bpf_attr>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Every entry of the hash map, read `CHUNK` at a time. Entries the
/// programs add or remove meanwhile may or may not be in it, as with any
/// walk of a map that changes.
///
/// # Errors
/// The first call the kernel refuses.
pub(super) fn lookup<K: aya::Pod, V: aya::Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let fd = u32::try_from(map.fd().as_fd().as_raw_fd()).map_err(io::Error::other)?;
    // SAFETY: `K` and `V` are plain data (`aya::Pod`), for which all zeros
    // is a valid value.
    let zero = || unsafe { std::mem::zeroed::<(K, V)>() };
    let (mut keys, mut values): (Vec<K>, Vec<V>) = (0..CHUNK).map(|_| zero()).unzip();
    let mut out = Vec::new();
    // The kernel's position in the map (a bucket, for a hash), which it
    // writes to `out_batch` and reads from `in_batch` on the next call.
    let (mut at, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        // SAFETY: as in `update`.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.batch.map_fd = fd;
        attr.batch.in_batch = if first {
            0
        } else {
            (&raw const at).addr() as u64
        };
        attr.batch.out_batch = (&raw mut next).addr() as u64;
        attr.batch.keys = keys.as_mut_ptr().addr() as u64;
        attr.batch.values = values.as_mut_ptr().addr() as u64;
        attr.batch.count = u32::try_from(CHUNK).map_err(io::Error::other)?;
        // SAFETY: `keys` and `values` have room for `count` keys and values
        // of the map's key and value sizes (aya checked them when the map
        // was typed); the kernel writes at most `count` of each, and the
        // number it wrote into `attr`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
                &raw mut attr,
                size_of::<bpf_attr>(),
            )
        };
        let error = (rc < 0).then(io::Error::last_os_error);
        // SAFETY: the kernel set `count`, also when it returns an error.
        let n = usize::try_from(unsafe { attr.batch.count }).map_err(io::Error::other)?;
        out.extend(
            keys[..n.min(CHUNK)]
                .iter()
                .copied()
                .zip(values[..n.min(CHUNK)].iter().copied()),
        );
        match error {
            None => {}
            // The end of the map.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) => return Err(e),
        }
        at = next;
        first = false;
    }
}
