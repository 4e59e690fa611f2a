//! Many hash map updates in one system call (`BPF_MAP_UPDATE_BATCH`, hash
//! maps since Linux 5.6): filling a million source addresses one
//! `BPF_MAP_UPDATE_ELEM` at a time spends most of the load in system
//! calls. aya 0.14 has no batch operations.

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

/// The map's data, for the hash maps this module writes.
pub(super) fn data(map: &Map) -> Option<&MapData> {
    match map {
        Map::HashMap(d) => Some(d),
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
