//! Grants as sets of ports, for the unions and differences that merge a
//! peer's own grants, its groups' and the runtime changes. Ranges rather
//! than a bitmap of every port: merging costs the size of the grant lists,
//! not 65,536 steps per peer and protocol, so a policy whose 65,536 peers
//! are all in groups merges as fast as one without groups.

use crate::policy::{Grant, Protocol};

/// A set of grants: the TCP and UDP ports as sorted, disjoint, non-adjacent
/// inclusive ranges, and whether ICMP echo is granted. Port 0 is no port
/// (nothing grants it, and the kernel never gets its bit), so it is never
/// in a set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrantSet {
    tcp: Vec<(u16, u16)>,
    udp: Vec<(u16, u16)>,
    icmp: bool,
}

impl GrantSet {
    /// The set of ports and ICMP that `grants` grant together.
    #[must_use]
    pub fn of(grants: &[Grant]) -> Self {
        let mut set = Self::default();
        for g in grants {
            match *g {
                Grant::Icmp => set.icmp = true,
                Grant::Ports {
                    protocol,
                    first,
                    last,
                } => {
                    let first = first.max(1);
                    if first <= last {
                        set.ranges_mut(protocol).push((first, last));
                    }
                }
            }
        }
        set.tcp = normalized(std::mem::take(&mut set.tcp));
        set.udp = normalized(std::mem::take(&mut set.udp));
        set
    }

    fn ranges_mut(&mut self, protocol: Protocol) -> &mut Vec<(u16, u16)> {
        match protocol {
            Protocol::Tcp => &mut self.tcp,
            Protocol::Udp => &mut self.udp,
        }
    }

    /// What either set grants.
    #[must_use]
    pub fn union(&self, other: &Self) -> Self {
        let join =
            |a: &[(u16, u16)], b: &[(u16, u16)]| normalized(a.iter().chain(b).copied().collect());
        Self {
            tcp: join(&self.tcp, &other.tcp),
            udp: join(&self.udp, &other.udp),
            icmp: self.icmp || other.icmp,
        }
    }

    /// What this set grants and `other` does not.
    #[must_use]
    pub fn difference(&self, other: &Self) -> Self {
        Self {
            tcp: difference(&self.tcp, &other.tcp),
            udp: difference(&self.udp, &other.udp),
            icmp: self.icmp && !other.icmp,
        }
    }

    /// What both sets grant.
    #[must_use]
    pub fn intersection(&self, other: &Self) -> Self {
        self.difference(&self.difference(other))
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.udp.is_empty() && !self.icmp
    }

    /// Whether the set grants `port` of IP protocol `protocol` (TCP or
    /// UDP), or ICMP echo when `port` is `None`.
    #[must_use]
    pub fn covers(&self, protocol: u8, port: Option<u16>) -> bool {
        let Some(port) = port else {
            return self.icmp;
        };
        let ranges = if protocol == Protocol::Tcp.number() {
            &self.tcp
        } else if protocol == Protocol::Udp.number() {
            &self.udp
        } else {
            return false;
        };
        let at = ranges.partition_point(|&(_, last)| last < port);
        ranges.get(at).is_some_and(|&(first, _)| first <= port)
    }

    /// The set as the fewest grants: TCP ranges, then UDP ranges, then
    /// `icmp`, each in port order.
    #[must_use]
    pub fn grants(&self) -> Vec<Grant> {
        let ports = |protocol: Protocol, ranges: &[(u16, u16)]| {
            ranges
                .iter()
                .map(move |&(first, last)| Grant::Ports {
                    protocol,
                    first,
                    last,
                })
                .collect::<Vec<_>>()
        };
        let mut out = ports(Protocol::Tcp, &self.tcp);
        out.extend(ports(Protocol::Udp, &self.udp));
        if self.icmp {
            out.push(Grant::Icmp);
        }
        out
    }
}

/// `ranges` sorted, with overlapping and adjacent ranges joined.
fn normalized(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ranges.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
    for (first, last) in ranges {
        match out.last_mut() {
            Some(prev) if u32::from(first) <= u32::from(prev.1) + 1 => prev.1 = prev.1.max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

/// The ports of the normalized `a` that are in no range of the normalized
/// `b`, in one pass over both.
fn difference(a: &[(u16, u16)], b: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut out = Vec::with_capacity(a.len());
    let mut j = 0;
    for &(first, last) in a {
        // Wide, so that the port after 65535 is a number.
        let mut start = u32::from(first);
        let end = u32::from(last);
        while b.get(j).is_some_and(|&(_, l)| u32::from(l) < start) {
            j += 1;
        }
        for &(cut_first, cut_last) in b[j..].iter().take_while(|&&(f, _)| u32::from(f) <= end) {
            if u32::from(cut_first) > start {
                out.push((port(start), port(u32::from(cut_first) - 1)));
            }
            start = start.max(u32::from(cut_last) + 1);
            if start > end {
                break;
            }
        }
        if start <= end {
            out.push((port(start), last));
        }
    }
    out
}

/// A port computed in `u32` that lies within a range of `u16` ports.
fn port(n: u32) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `tcp/first-last`; the grants module's tests use it too.
    pub(crate) fn tcp(first: u16, last: u16) -> Grant {
        Grant::Ports {
            protocol: Protocol::Tcp,
            first,
            last,
        }
    }

    fn udp(first: u16, last: u16) -> Grant {
        Grant::Ports {
            protocol: Protocol::Udp,
            first,
            last,
        }
    }

    /// The set as a bitmap of every port, the obvious model.
    fn bits(set: &GrantSet) -> (Vec<bool>, Vec<bool>, bool) {
        let mut t = vec![false; 65536];
        let mut u = vec![false; 65536];
        for g in set.grants() {
            if let Grant::Ports {
                protocol,
                first,
                last,
            } = g
            {
                let map = if protocol == Protocol::Tcp {
                    &mut t
                } else {
                    &mut u
                };
                for p in first..=last {
                    map[usize::from(p)] = true;
                }
            }
        }
        (t, u, set.icmp)
    }

    #[test]
    fn ranges_join_and_split() {
        let set = GrantSet::of(&[
            tcp(10, 20),
            tcp(21, 30),
            tcp(5, 12),
            udp(53, 53),
            Grant::Icmp,
        ]);
        assert_eq!(set.grants(), vec![tcp(5, 30), udp(53, 53), Grant::Icmp]);
        let cut = set.difference(&GrantSet::of(&[tcp(5, 5), tcp(15, 16), tcp(30, 40)]));
        assert_eq!(
            cut.grants(),
            vec![tcp(6, 14), tcp(17, 29), udp(53, 53), Grant::Icmp]
        );
        let edges = GrantSet::of(&[tcp(1, 65535)])
            .difference(&GrantSet::of(&[tcp(1, 1), tcp(65535, 65535)]));
        assert_eq!(edges.grants(), vec![tcp(2, 65534)]);
        assert!(GrantSet::of(&[tcp(0, 0)]).is_empty(), "port 0 is no port");
    }

    #[test]
    fn covers_ports_and_icmp() {
        let set = GrantSet::of(&[tcp(8000, 8100), udp(53, 53)]);
        assert!(set.covers(6, Some(8000)) && set.covers(6, Some(8100)));
        assert!(!set.covers(6, Some(7999)) && !set.covers(6, Some(8101)));
        assert!(set.covers(17, Some(53)) && !set.covers(6, Some(53)));
        assert!(!set.covers(1, None) && !set.covers(47, Some(53)));
        assert!(GrantSet::of(&[Grant::Icmp]).covers(1, None));
    }

    /// What an operation does to one port.
    type Op = fn(bool, bool) -> bool;

    /// Union, difference and intersection agree with bitmaps on random
    /// range lists.
    #[test]
    fn operations_agree_with_bitmaps() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut random = || {
            let n = next() % 6;
            (0..n)
                .map(|_| {
                    let r = next();
                    // Small ports so that ranges meet; now and then the edges.
                    let first = u16::try_from(r % 200).unwrap_or(0)
                        + if r & 1 << 20 == 0 { 0 } else { 65_300 };
                    let last = first.saturating_add(u16::try_from((r >> 8) % 40).unwrap_or(0));
                    match (r >> 16) % 5 {
                        0 => Grant::Icmp,
                        1 | 2 => tcp(first, last),
                        _ => udp(first, last),
                    }
                })
                .collect::<Vec<_>>()
        };
        for _ in 0..500 {
            let (a, b) = (GrantSet::of(&random()), GrantSet::of(&random()));
            let (at, au, ai) = bits(&a);
            let (bt, bu, bi) = bits(&b);
            let zip = |x: &[bool], y: &[bool], f: fn(bool, bool) -> bool| {
                x.iter().zip(y).map(|(&p, &q)| f(p, q)).collect::<Vec<_>>()
            };
            let ops: [(GrantSet, Op); 3] = [
                (a.union(&b), |p, q| p || q),
                (a.difference(&b), |p, q| p && !q),
                (a.intersection(&b), |p, q| p && q),
            ];
            for (got, f) in ops {
                assert_eq!(
                    bits(&got),
                    (zip(&at, &bt, f), zip(&au, &bu, f), f(ai, bi)),
                    "{a:?} {b:?}"
                );
                // Normalized: building it again from its grants changes nothing.
                assert_eq!(GrantSet::of(&got.grants()), got);
            }
        }
    }
}
