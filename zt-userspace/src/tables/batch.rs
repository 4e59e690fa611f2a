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

/// The map's file descriptor, once its key and value sizes are checked to
/// be `K`'s and `V`'s: the kernel copies `key_size` and `value_size` bytes
/// per entry, whatever buffers it is given.
fn checked_fd<K, V>(map: &MapData) -> io::Result<u32> {
    let info = map.info().map_err(io::Error::other)?;
    let sizes = (info.key_size() as usize, info.value_size() as usize);
    if sizes != (size_of::<K>(), size_of::<V>()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the map's keys and values are {} and {} bytes, this binary's {} and {}",
                sizes.0,
                sizes.1,
                size_of::<K>(),
                size_of::<V>()
            ),
        ));
    }
    u32::try_from(map.fd().as_fd().as_raw_fd()).map_err(io::Error::other)
}

/// A buffer's address as the kernel takes it; exposed, since the kernel
/// reads or writes through it.
fn user_ptr<T>(p: *const T) -> u64 {
    p.expose_provenance() as u64
}

/// The `bpf(2)` system call `cmd` with `attr`.
///
/// # Safety
/// The addresses in `attr` must point at memory the command may read or
/// write as the kernel documents it, alive for the call.
unsafe fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
    // SAFETY: `attr` is a whole bpf_attr; what it points at, the caller
    // vouches for.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
    let fd = checked_fd::<K, V>(map)?;
    for (k, v) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        // SAFETY: all zeros is a valid bpf_attr (plain integers), and the
        // kernel requires the bytes past the command's fields to be zero.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.batch.map_fd = fd;
        attr.batch.keys = user_ptr(k.as_ptr());
        attr.batch.values = user_ptr(v.as_ptr());
        attr.batch.count = u32::try_from(k.len()).map_err(io::Error::other)?;
        // SAFETY: `keys` and `values` point at `count` keys and values of
        // the map's key and value sizes (`checked_fd`), alive for the call;
        // the kernel only reads them, and writes `count` back into `attr`.
        unsafe { bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr) }?;
    }
    Ok(())
}

/// Calls `each` with every entry of the hash map, read `CHUNK` at a
/// time. Entries the programs add or remove meanwhile may or may not be
/// seen, as with any walk of a map that changes.
///
/// # Errors
/// The first call the kernel refuses, or sizes other than `K`'s and `V`'s.
pub(super) fn for_each<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    mut each: impl FnMut(&K, &V),
) -> io::Result<()> {
    let fd = checked_fd::<K, V>(map)?;
    // SAFETY: `K` and `V` are plain data (`aya::Pod`), for which all zeros
    // is a valid value.
    let zero = || unsafe { std::mem::zeroed::<(K, V)>() };
    let (mut keys, mut values): (Vec<K>, Vec<V>) = (0..CHUNK).map(|_| zero()).unzip();
    // The kernel's position in the map (a bucket, for a hash), which it
    // writes to `out_batch` and reads from `in_batch` on the next call.
    let (mut at, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        // SAFETY: as in `update`.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.batch.map_fd = fd;
        attr.batch.in_batch = if first { 0 } else { user_ptr(&raw const at) };
        // The kernel writes these three: pointers that may write.
        attr.batch.out_batch = user_ptr((&raw mut next).cast_const());
        attr.batch.keys = user_ptr(keys.as_mut_ptr().cast_const());
        attr.batch.values = user_ptr(values.as_mut_ptr().cast_const());
        attr.batch.count = u32::try_from(CHUNK).map_err(io::Error::other)?;
        // SAFETY: `keys` and `values` have room for `count` keys and values
        // of the map's key and value sizes (`checked_fd`); the kernel
        // writes at most `count` of each, the token into `next`, and the
        // number it wrote into `attr`. Nothing else uses them meanwhile.
        let error = unsafe { bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        // SAFETY: the kernel set `count`, also when it returns ENOENT.
        let n = usize::try_from(unsafe { attr.batch.count })
            .map_err(io::Error::other)?
            .min(CHUNK);
        match error {
            None => {}
            // The end of the map, with the last entries.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                keys[..n]
                    .iter()
                    .zip(&values[..n])
                    .for_each(|(k, v)| each(k, v));
                return Ok(());
            }
            Some(e) => return Err(e),
        }
        keys[..n]
            .iter()
            .zip(&values[..n])
            .for_each(|(k, v)| each(k, v));
        // SAFETY: written by the kernel above, read by no one else.
        at = unsafe { (&raw const next).read_volatile() };
        first = false;
    }
}
