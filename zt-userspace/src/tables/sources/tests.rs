use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;

fn v4(list: &[(&str, u64)]) -> BTreeMap<LpmParts<4>, u64> {
    list.iter()
        .map(|(net, mask)| {
            let (addr, len) = net.split_once('/').unwrap_or((net, "32"));
            let addr: Ipv4Addr = addr.parse().unwrap_or_else(|e| panic!("{net}: {e}"));
            ((addr.octets(), len.parse().unwrap_or(32)), *mask)
        })
        .collect()
}

fn v6(list: &[(&str, u64)]) -> BTreeMap<LpmParts<16>, u64> {
    list.iter()
        .map(|(net, mask)| {
            let (addr, len) = net.split_once('/').unwrap_or((net, "128"));
            let addr: Ipv6Addr = addr.parse().unwrap_or_else(|e| panic!("{net}: {e}"));
            ((addr.octets(), len.parse().unwrap_or(128)), *mask)
        })
        .collect()
}

/// What the program computes for `addr`.
fn lookup_v4(s: &Sources, addr: &str) -> u64 {
    let a: Ipv4Addr = addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.services_of(a.into())
}

/// As [`lookup_v4`], for IPv6.
fn lookup_v6(s: &Sources, addr: &str) -> u64 {
    let a: Ipv6Addr = addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.services_of(a.into())
}

#[test]
fn each_prefix_goes_to_the_map_of_its_length_and_an_address_gets_the_union() {
    let s = Sources::of(
        &v4(&[
            ("10.0.0.0/8", 1),
            ("10.1.0.0/16", 2),
            ("10.1.2.0/23", 4),
            ("10.1.2.128/25", 8),
            ("10.1.3.7/32", 16),
        ]),
        &BTreeMap::new(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.v4_blocks.len(), 256, "a /8 is 256 blocks");
    assert_eq!(s.v4_24.len(), 2, "a /23 is two /24s");
    assert_eq!(s.v4_32.len(), 129, "a /25 is 128 addresses, plus one /32");
    for (addr, want) in [
        ("10.200.0.1", 1),
        ("10.1.200.1", 1 | 2),
        ("10.1.2.1", 1 | 2 | 4),
        ("10.1.2.200", 1 | 2 | 4 | 8),
        ("10.1.3.7", 1 | 2 | 4 | 16),
        ("10.1.3.8", 1 | 2 | 4),
        ("10.1.4.0", 1 | 2),
        ("11.0.0.0", 0),
        ("9.255.255.255", 0),
    ] {
        assert_eq!(lookup_v4(&s, addr), want, "{addr}");
    }
    // Only blocks with longer prefixes in them send the program further.
    let blocks = s.blocks();
    assert_eq!(
        blocks.get(&(10 << 8 | 1)).map(|b| b.deeper),
        Some(SOURCE_DEEPER_24 | SOURCE_DEEPER_32)
    );
    assert_eq!(blocks.get(&(10 << 8 | 2)).map(|b| b.deeper), Some(0));
}

#[test]
fn the_whole_space_is_every_block() {
    let s = Sources::of(&v4(&[("0.0.0.0/0", 1)]), &v6(&[("::/0", 2)]))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.v4_blocks.len(), 65_536);
    assert_eq!(lookup_v4(&s, "255.255.255.255"), 1);
    assert_eq!(lookup_v6(&s, "2001:db8::1"), 2);
}

#[test]
fn ipv6_is_one_exact_lookup_per_length_in_use() {
    let s = Sources::of(
        &BTreeMap::new(),
        &v6(&[
            ("2001:db8::/32", 1),
            ("2001:db8:aa::/48", 2),
            ("2001:db8:aa:1::/64", 4),
            ("2001:db8:aa:1::5/128", 8),
            ("2001:db8:ab::/48", 16),
        ]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!s.v6_in_trie());
    let lengths = s.lengths;
    assert_eq!(lengths.count, 4);
    assert_eq!(lengths.lengths[..4], [32, 48, 64, 128]);
    for (addr, want) in [
        ("2001:db8:aa:1::5", 1 | 2 | 4 | 8),
        ("2001:db8:aa:1::6", 1 | 2 | 4),
        ("2001:db8:aa:2::", 1 | 2),
        ("2001:db8:ab::1", 1 | 16),
        ("2001:db9::", 0),
    ] {
        assert_eq!(lookup_v6(&s, addr), want, "{addr}");
    }
}

#[test]
fn past_the_bound_on_lengths_ipv6_goes_to_the_trie_with_inherited_masks() {
    let many: Vec<(String, u64)> = (0..=capacity::SOURCE_V6_LENGTHS)
        .map(|i| (format!("2001:db8::/{}", 32 + i), 1u64 << (i % 64)))
        .collect();
    let list: Vec<(&str, u64)> = many.iter().map(|(n, m)| (n.as_str(), *m)).collect();
    let s = Sources::of(&BTreeMap::new(), &v6(&list)).unwrap_or_else(|e| panic!("{e}"));
    assert!(s.v6_in_trie());
    assert!(s.v6.is_empty());
    assert_eq!(s.lengths.count, SOURCE_V6_USE_TRIE);
    // The longest prefix holds the bits of all the shorter ones.
    let longest = s.v6_trie.values().max_by_key(|m| m.count_ones());
    assert_eq!(
        longest.map(|m| m.count_ones()),
        Some(capacity::SOURCE_V6_LENGTHS + 1)
    );
}

#[test]
fn narrowing_keeps_what_both_admit_in_every_map() {
    let old = Sources::of(
        &v4(&[("10.0.0.0/8", 1), ("192.0.2.0/24", 3), ("198.51.100.7", 1)]),
        &v6(&[("2001:db8::/32", 1)]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let new = Sources::of(
        &v4(&[("10.0.0.0/16", 1), ("192.0.2.0/24", 2)]),
        &v6(&[("2001:db8::/32", 3)]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let n = old.narrowed(&new);
    assert_eq!(lookup_v4(&n, "10.0.0.1"), 1);
    assert_eq!(lookup_v4(&n, "10.1.0.1"), 0, "only the old /8 holds it");
    assert_eq!(lookup_v4(&n, "192.0.2.9"), 2);
    assert_eq!(lookup_v4(&n, "198.51.100.7"), 0);
    assert_eq!(lookup_v6(&n, "2001:db8::1"), 1);
}

#[test]
fn a_map_past_its_capacity_is_refused() {
    // 8,193 /25s are 128 addresses each, and two more /26s 64 each, one
    // of them inside the first /25: 1,048,768 in all, past the 1,048,576
    // the address map holds. The count is the whole list's, not where the
    // expansion stopped.
    let mut too_many: BTreeMap<LpmParts<4>, u64> = (0u32..8193)
        .map(|i| (((10 << 24) | (i << 7)).to_be_bytes(), 25))
        .map(|k| (k, 1))
        .collect();
    too_many.insert(([10, 0, 0, 0], 26), 2);
    too_many.insert(([11, 0, 0, 0], 26), 2);
    match Sources::of(&too_many, &BTreeMap::new()) {
        Err(TablesError::TooMany { count, limit, .. }) => {
            assert_eq!((count, limit), (8193 * 128 + 64, 1 << 20));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn entries_the_program_does_not_look_up_admit_no_one() {
    let mut s = Sources::of(
        &v4(&[("10.1.2.0/24", 1), ("10.1.3.4/32", 2), ("10.2.0.0/16", 4)]),
        &v6(&[("2001:db8::/32", 1), ("2001:db8:1::/48", 2)]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.looked_up_entries(), s, "a policy's own are all looked up");
    // Behind ztxdp's back: 10.1.0.0/16 no longer sends lookups to the
    // address map, and the lengths leave /48 out.
    s.deeper.insert(10 << 8 | 1, SOURCE_DEEPER_24);
    s.lengths.count = 1;
    let seen = s.looked_up_entries();
    assert_eq!(lookup_v4(&seen, "10.1.2.9"), 1);
    assert_eq!(lookup_v4(&seen, "10.1.3.4"), 0);
    assert_eq!(lookup_v4(&s, "10.1.3.4"), 0, "as the program computes it");
    assert_eq!(seen.v4_32.len(), 0);
    assert_eq!(lookup_v4(&seen, "10.2.9.9"), 4);
    assert_eq!(seen.v6_prefixes().len(), 1);
    assert_eq!(lookup_v6(&seen, "2001:db8:1::1"), 1);
}
