//! The hash chain that makes an edit of the audit trail detectable.
//!
//! Definition (also in the README):
//!
//! - Every record is one line of JSON whose last member is ztxdp's own
//!   object (`ztxdp` in ECS, `unmapped` in OCSF), which ends with the
//!   `chain` member. So a line
//!   ends with `,"chain":"` + 64 lowercase hex digits + `"}}`.
//! - The record's *unchained text* is the line without its newline and
//!   without the 75 bytes `,"chain":"<64 hex>"` just before the final `}}`.
//! - `chain = hex(SHA-256(P || U))`, where `U` is the unchained text and `P`
//!   is the previous record's chain value as its 64 ASCII hex characters (64
//!   `0` characters before the first record, `ztxdp.seq` 1).
//!
//! A shell can check one link:
//! `printf '%s' "$PREV$(sed -E 's/,"chain":"[0-9a-f]{64}"\}\}$/}}/' <<<"$LINE")" | sha256sum`.

use sha2::{Digest as _, Sha256};

/// The chain value before the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Hex digits of a chain value.
pub const HEX_LEN: usize = 64;
/// What precedes the chain value in a line.
const MEMBER: &str = ",\"chain\":\"";
/// What follows it: the end of the string, of `ztxdp`, and of the record.
const END: &str = "\"}}";

/// `hex(SHA-256(prev || unchained))`.
#[must_use]
pub fn link(prev: &str, unchained: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(unchained.as_bytes());
    h.finalize()
        .iter()
        .fold(String::with_capacity(HEX_LEN), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The line for `unchained` (which ends with the `}}` that closes `ztxdp`
/// and the record) after a record whose chain was `prev`; returns the line
/// (without newline) and its chain value.
#[must_use]
pub fn seal(prev: &str, unchained: &str) -> (String, String) {
    debug_assert!(
        unchained.ends_with("}}"),
        "the ztxdp object must close the record: {unchained}"
    );
    let chain = link(prev, unchained);
    (attach(unchained, &chain), chain)
}

/// The line for `unchained` with a known chain value: how a reader that got
/// a record and its chain renders the exact line the file holds.
#[must_use]
pub fn attach(unchained: &str, chain: &str) -> String {
    let body = unchained.strip_suffix("}}").unwrap_or(unchained);
    format!("{body}{MEMBER}{chain}{END}")
}

/// Splits a line (without newline) into its unchained text and its chain
/// value; `None` when the line does not end with a chain member.
#[must_use]
pub fn split(line: &str) -> Option<(String, &str)> {
    let before_end = line.strip_suffix(END)?;
    let at = before_end.len().checked_sub(HEX_LEN)?;
    let chain = before_end.get(at..)?;
    if !chain
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let body = before_end.get(..at)?.strip_suffix(MEMBER)?;
    Some((format!("{body}}}}}"), chain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_input() {
        // echo -n abc | sha256sum, with an empty "previous" value.
        assert_eq!(
            link("", "abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn seal_and_split_are_inverse_and_chain_links() {
        let u1 = r#"{"a":1,"ztxdp":{"seq":1}}"#;
        let (l1, c1) = seal(GENESIS, u1);
        assert_eq!(
            l1,
            format!(r#"{{"a":1,"ztxdp":{{"seq":1,"chain":"{c1}"}}}}"#)
        );
        assert_eq!(split(&l1), Some((u1.to_owned(), c1.as_str())));
        assert_eq!(c1, link(GENESIS, u1));
        let u2 = r#"{"a":2,"ztxdp":{"peer":{"name":"x"},"seq":2}}"#;
        let (l2, c2) = seal(&c1, u2);
        assert_eq!(split(&l2).map(|(u, _)| u), Some(u2.to_owned()));
        assert_eq!(
            c2,
            link(&c1, u2),
            "the second link hashes the first chain value"
        );
        assert_ne!(c2, link(GENESIS, u2));
        serde_json::from_str::<serde_json::Value>(&l2)
            .unwrap_or_else(|e| panic!("sealed line is JSON: {e}"));
    }

    #[test]
    fn split_refuses_lines_without_a_chain() {
        assert_eq!(split(r#"{"ztxdp":{"seq":1}}"#), None);
        let bad_hex = format!(
            r#"{{"ztxdp":{{"seq":1,"chain":"{}"}}}}"#,
            "G".repeat(HEX_LEN)
        );
        assert_eq!(split(&bad_hex), None);
        let short = r#"{"ztxdp":{"seq":1,"chain":"abc"}}"#;
        assert_eq!(split(short), None);
    }
}
