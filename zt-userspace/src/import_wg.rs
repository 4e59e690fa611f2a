//! `ztxdp import-wg`: the peers of a `WireGuard` interface as `[[tunnel.peer]]`
//! entries with no grants, so that writing a ztxdp config starts from the
//! keys and addresses `WireGuard` already has.
//!
//! Two sources: a wg-quick file (`/etc/wireguard/wg0.conf`), where a comment
//! can name a peer, and a running interface through `wg show IFACE dump`,
//! which knows no names. Peers without a name become `peer-N` (N counts from
//! 1 in the order `WireGuard` lists them).

use std::{
    collections::{HashMap, hash_map::Entry},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use ipnet::IpNet;

use crate::config::{MAX_FILE_BYTES, is_wireguard_key, read_bounded};

/// The most peers an import gives: a config holds no more.
const MAX_PEERS: usize = zt_common::capacity::PEERS as usize;

/// Why peers could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read WireGuard config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run `wg show {interface} dump` (is wireguard-tools installed?): {source}")]
    Spawn {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`wg show {interface} dump` failed ({status}): {stderr}")]
    Wg {
        interface: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{origin}:{line}: {problem}")]
    Parse {
        /// The file, or the command whose output was read.
        origin: String,
        line: usize,
        problem: Problem,
    },
}

/// What is wrong with one line. Never quotes a whole line: it could hold a
/// private key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("expected `[Section]`, `Key = Value` or a comment")]
    Syntax,
    #[error("unknown section [{name}]; a WireGuard config has [Interface] and [Peer]")]
    UnknownSection { name: String },
    #[error("{key} before the first [Interface] or [Peer] section")]
    OutsideSection { key: String },
    #[error("this [Peer] has no PublicKey")]
    MissingPublicKey,
    #[error("{value:?} is not a WireGuard public key (44 base64 characters ending in '=')")]
    BadPublicKey { value: String },
    #[error("AllowedIPs entry {value:?} is not an address or prefix")]
    BadAllowedIp { value: String },
    #[error("public key {key} is already used by the peer on line {first}")]
    DuplicatePeer { key: String, first: usize },
    #[error("more than {limit} peers; a ztxdp config holds no more (the kernel peer maps' size)")]
    TooManyPeers { limit: usize },
    #[error("expected 8 tab-separated fields for a peer, found {found}")]
    DumpFields { found: usize },
}

/// One `WireGuard` peer, as it will appear under `[[tunnel.peer]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportedPeer {
    pub name: String,
    pub public_key: String,
    /// `AllowedIPs`, in the order written.
    pub allowed_ips: Vec<IpNet>,
}

/// Reads the peers of a wg-quick configuration file.
///
/// # Errors
/// [`ImportError::Read`] when the file cannot be read or is larger than
/// [`crate::config::MAX_FILE_BYTES`], else as [`parse_config`].
pub fn from_file(path: &Path) -> Result<Vec<ImportedPeer>, ImportError> {
    let text = read_bounded(path, MAX_FILE_BYTES).map_err(|source| ImportError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_config(&text, &path.display().to_string())
}

/// Reads the peers of the running interface `interface` (`wg show IFACE dump`).
///
/// # Errors
/// When `wg` cannot run or fails (no such interface, not root), or its
/// output cannot be parsed.
pub fn live(interface: &str) -> Result<Vec<ImportedPeer>, ImportError> {
    let output = Command::new("wg")
        .args(["show", interface, "dump"])
        .output()
        .map_err(|source| ImportError::Spawn {
            interface: interface.to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(ImportError::Wg {
            interface: interface.to_owned(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    parse_dump(
        &String::from_utf8_lossy(&output.stdout),
        &format!("wg show {interface} dump"),
    )
}

/// A peer being read from a wg-quick file.
struct Draft {
    /// Line of its `[Peer]` header.
    line: usize,
    name: Option<String>,
    /// Whether a key was read: comments after one describe keys, not the peer.
    keyed: bool,
    public_key: Option<String>,
    allowed_ips: Vec<IpNet>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    Interface,
    Peer,
}

/// The state of a wg-quick file read line by line.
struct Reader {
    section: Section,
    drafts: Vec<Draft>,
    /// First usable line of the comment block just read: a name candidate.
    comment: Option<String>,
}

impl Reader {
    fn line(&mut self, line: usize, raw: &str) -> Result<(), Problem> {
        let (content, note) = match raw.split_once('#') {
            Some((content, note)) => (content.trim(), Some(note)),
            None => (raw.trim(), None),
        };
        if content.is_empty() {
            match note {
                Some(note) if self.comment.is_none() => self.comment = name_in_comment(note),
                Some(_) => {}
                // A blank line ends the block: it names nothing below it.
                None => self.comment = None,
            }
            return Ok(());
        }
        if let Some(header) = content.strip_prefix('[') {
            let name = header.strip_suffix(']').ok_or(Problem::Syntax)?.trim();
            return self.header(line, name, note);
        }
        let (key, value) = content.split_once('=').ok_or(Problem::Syntax)?;
        let (key, value) = (key.trim(), value.trim());
        // A key is one word; `PrivateKey abc=` is a missing `=`, not a key.
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(Problem::Syntax);
        }
        let inside = self.comment.take();
        match (self.section, self.drafts.last_mut()) {
            (Section::None, _) => Err(Problem::OutsideSection {
                key: key.to_owned(),
            }),
            (Section::Peer, Some(draft)) => {
                if draft.name.is_none() && !draft.keyed {
                    draft.name = inside;
                }
                draft.keyed = true;
                if key.eq_ignore_ascii_case("publickey") {
                    draft.public_key = Some(public_key(value)?);
                } else if key.eq_ignore_ascii_case("allowedips") {
                    draft.allowed_ips.extend(allowed_ips(value)?);
                }
                Ok(())
            }
            // [Interface] keys, which describe this host, not a peer.
            _ => Ok(()),
        }
    }

    fn header(&mut self, line: usize, name: &str, note: Option<&str>) -> Result<(), Problem> {
        let above = self.comment.take();
        if name.eq_ignore_ascii_case("interface") {
            self.section = Section::Interface;
        } else if name.eq_ignore_ascii_case("peer") {
            if self.drafts.len() == MAX_PEERS {
                return Err(Problem::TooManyPeers { limit: MAX_PEERS });
            }
            self.section = Section::Peer;
            self.drafts.push(Draft {
                line,
                name: above.or_else(|| note.and_then(name_in_comment)),
                keyed: false,
                public_key: None,
                allowed_ips: Vec::new(),
            });
        } else {
            return Err(Problem::UnknownSection {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    /// The peers, each with the line of its `[Peer]` header.
    fn finish(self) -> Result<Vec<(usize, ImportedPeer)>, (usize, Problem)> {
        self.drafts
            .into_iter()
            .enumerate()
            .map(|(index, draft)| {
                let public_key = draft
                    .public_key
                    .ok_or((draft.line, Problem::MissingPublicKey))?;
                let peer = ImportedPeer {
                    name: draft.name.unwrap_or_else(|| default_name(index)),
                    public_key,
                    allowed_ips: draft.allowed_ips,
                };
                Ok((draft.line, peer))
            })
            .collect()
    }
}

/// Parses a wg-quick configuration; `origin` names it in errors.
///
/// Section and key names are case-insensitive and `#` starts a comment, as
/// in wg-quick. A peer's name is the first line of the comment block right
/// above its `[Peer]` header (no blank line between), or else a comment on
/// the header line, or else a comment inside its section before its first
/// key; `# Name = X` and `# name: X` give `X`.
///
/// # Errors
/// [`ImportError::Parse`] with the line of the first problem.
pub fn parse_config(text: &str, origin: &str) -> Result<Vec<ImportedPeer>, ImportError> {
    let error = |(line, problem)| ImportError::Parse {
        origin: origin.to_owned(),
        line,
        problem,
    };
    let mut reader = Reader {
        section: Section::None,
        drafts: Vec::new(),
        comment: None,
    };
    for (i, raw) in text.lines().enumerate() {
        reader
            .line(i + 1, raw)
            .map_err(|problem| error((i + 1, problem)))?;
    }
    reader.finish().and_then(unique_keys).map_err(error)
}

/// Parses `wg show IFACE dump`: an interface line (private key, public key,
/// listen port, fwmark), then one line per peer: public key, preshared key,
/// endpoint, allowed IPs, latest handshake, rx, tx, persistent keepalive.
///
/// # Errors
/// [`ImportError::Parse`] with the line of the first problem.
pub fn parse_dump(text: &str, origin: &str) -> Result<Vec<ImportedPeer>, ImportError> {
    const PEER_FIELDS: usize = 8;
    let error = |line, problem| ImportError::Parse {
        origin: origin.to_owned(),
        line,
        problem,
    };
    let mut peers = Vec::new();
    // The first line is the interface, private key included: never echoed.
    for (i, raw) in text.lines().enumerate().skip(1) {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        if peers.len() == MAX_PEERS {
            return Err(error(line, Problem::TooManyPeers { limit: MAX_PEERS }));
        }
        let fields: Vec<&str> = raw.split('\t').collect();
        if fields.len() != PEER_FIELDS {
            return Err(error(
                line,
                Problem::DumpFields {
                    found: fields.len(),
                },
            ));
        }
        let public_key = public_key(fields[0]).map_err(|p| error(line, p))?;
        let allowed_ips = match fields[3] {
            "(none)" => Vec::new(),
            list => allowed_ips(list).map_err(|p| error(line, p))?,
        };
        let name = default_name(peers.len());
        peers.push((
            line,
            ImportedPeer {
                name,
                public_key,
                allowed_ips,
            },
        ));
    }
    unique_keys(peers).map_err(|(line, problem)| error(line, problem))
}

fn default_name(index: usize) -> String {
    format!("peer-{}", index + 1)
}

/// The name a comment gives, if it gives a usable one: not empty and not an
/// address (config names must not look like one).
fn name_in_comment(note: &str) -> Option<String> {
    let text = note.trim_start_matches('#').trim();
    let name = text
        .get(..4)
        .filter(|head| head.eq_ignore_ascii_case("name"))
        .and_then(|_| {
            let rest = text[4..].trim_start();
            rest.strip_prefix('=').or_else(|| rest.strip_prefix(':'))
        })
        .map_or(text, str::trim);
    let name = safe_name(name);
    let looks_like_address = name.parse::<IpAddr>().is_ok() || name.parse::<IpNet>().is_ok();
    (!name.is_empty() && !looks_like_address).then_some(name)
}

/// `text` made a valid peer name (see `config::peer_name_byte`): each run
/// of other characters becomes one `-`, none at either end, cut to
/// `config::MAX_PEER_NAME` bytes. "app 2" becomes "app-2".
fn safe_name(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii() && crate::config::peer_name_byte(c as u8) {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(crate::config::MAX_PEER_NAME);
    out.trim_end_matches('-').to_owned()
}

fn public_key(value: &str) -> Result<String, Problem> {
    if is_wireguard_key(value) {
        Ok(value.to_owned())
    } else {
        Err(Problem::BadPublicKey {
            value: value.to_owned(),
        })
    }
}

/// A comma-separated list; a bare address means its host prefix, as in `wg`.
fn allowed_ips(list: &str) -> Result<Vec<IpNet>, Problem> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| Problem::BadAllowedIp {
                    value: item.to_owned(),
                })
        })
        .collect()
}

/// The peers without their lines, once no public key appears twice. One
/// hash lookup a peer: comparing each with every earlier one took 8 s for
/// 40,000 peers.
fn unique_keys(peers: Vec<(usize, ImportedPeer)>) -> Result<Vec<ImportedPeer>, (usize, Problem)> {
    let mut first_line: HashMap<&str, usize> = HashMap::with_capacity(peers.len());
    for (line, peer) in &peers {
        match first_line.entry(&peer.public_key) {
            Entry::Occupied(first) => {
                return Err((
                    *line,
                    Problem::DuplicatePeer {
                        key: peer.public_key.clone(),
                        first: *first.get(),
                    },
                ));
            }
            Entry::Vacant(slot) => {
                slot.insert(*line);
            }
        }
    }
    Ok(peers.into_iter().map(|(_, peer)| peer).collect())
}

/// The `[[tunnel.peer]]` entries for `peers`, with a comment naming where
/// they came from; `allow` is empty, for the reader to fill in.
///
/// Written directly rather than through a TOML serializer, which took
/// 40 % of an import's time for a form this fixed; [`basic_string`]
/// escapes what TOML requires.
/// With `group`, a `[[tunnel.group]]` of that name follows, listing every
/// peer, with `allow = []` (none without peers: a group needs one).
#[must_use]
pub fn render(peers: &[ImportedPeer], origin: &str, group: Option<&str>) -> String {
    use std::fmt::Write as _;
    // A comment ends at a line break: one in a file name must not end it.
    let origin: String = origin
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    let mut out = format!(
        "# {} peer(s) imported from {origin}. Grant ports in `allow`, e.g.\n\
         # allow = [\"tcp/5432\", \"udp/53\", \"tcp/8000-8100\", \"icmp\"]\n",
        peers.len()
    );
    for (i, peer) in peers.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let addresses: Vec<String> = peer
            .allowed_ips
            .iter()
            .map(|net| basic_string(&net.to_string()))
            .collect();
        let _ = write!(
            out,
            "[[tunnel.peer]]\nname = {}\naddresses = [{}]\npublic_key = {}\nallow = []\n",
            basic_string(&peer.name),
            addresses.join(", "),
            basic_string(&peer.public_key)
        );
    }
    if let Some(group) = group.filter(|_| !peers.is_empty()) {
        let names: Vec<String> = peers.iter().map(|p| basic_string(&p.name)).collect();
        let _ = write!(
            out,
            "\n[[tunnel.group]]\nname = {}\npeers = [{}]\nallow = []\n",
            basic_string(group),
            names.join(", ")
        );
    }
    out
}

/// `text` as a TOML basic string: quoted, with `"`, `\` and control
/// characters escaped.
fn basic_string(text: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const KEY_A: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const KEY_B: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
    const KEY_C: &str = "gN65BkIKy1eCE9pP1wdc8ROUtkHLF2PfAqYdyYBz6EA=";
    const PRIVATE: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

    fn net(s: &str) -> IpNet {
        s.parse().unwrap_or_else(|e| panic!("test prefix {s}: {e}"))
    }

    fn parse_err(text: &str) -> (usize, Problem) {
        match parse_config(text, "wg0.conf") {
            Err(ImportError::Parse {
                line,
                problem,
                origin,
            }) => {
                assert_eq!(origin, "wg0.conf");
                (line, problem)
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn reads_peers_names_and_repeated_allowed_ips() {
        let text = format!(
            "[Interface]\n\
             # the edge itself\n\
             PrivateKey = {PRIVATE}\n\
             Address = 10.100.0.254/24\n\
             ListenPort = 51820\n\
             \n\
             # app-1\n\
             # database client\n\
             [Peer]\n\
             PublicKey = {KEY_A}\n\
             AllowedIPs = 10.100.0.1/32, fd00:100::1/128\n\
             allowedips=10.100.1.0/24 # a second line adds to the first\n\
             Endpoint = 192.0.2.1:51820\n\
             \n\
             [peer]\n\
             # Name = app 2\n\
             publickey={KEY_B}\n\
             AllowedIPs = 10.100.0.2\n\
             \n\
             [Peer]\n\
             PublicKey = {KEY_C}\n"
        );
        let peers = parse_config(&text, "wg0.conf").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            peers,
            vec![
                ImportedPeer {
                    name: "app-1".into(),
                    public_key: KEY_A.into(),
                    allowed_ips: vec![
                        net("10.100.0.1/32"),
                        net("fd00:100::1/128"),
                        net("10.100.1.0/24")
                    ],
                },
                ImportedPeer {
                    name: "app-2".into(),
                    public_key: KEY_B.into(),
                    allowed_ips: vec![net("10.100.0.2/32")],
                },
                ImportedPeer {
                    name: "peer-3".into(),
                    public_key: KEY_C.into(),
                    allowed_ips: vec![],
                },
            ]
        );
    }

    #[test]
    fn which_comment_names_a_peer() {
        let peer = |before: &str, header: &str, inside: &str| {
            let text = format!("{before}[Peer]{header}\n{inside}PublicKey = {KEY_A}\n");
            let peers = parse_config(&text, "wg0.conf").unwrap_or_else(|e| panic!("{e}"));
            peers[0].name.clone()
        };
        assert_eq!(peer("# above\n", "", ""), "above");
        assert_eq!(peer("", " # on-header", ""), "on-header");
        assert_eq!(peer("", "", "# inside\n"), "inside");
        assert_eq!(peer("# name: db-1\n", "", ""), "db-1");
        // Made a valid peer name: what config refuses never comes out.
        assert_eq!(peer("# app \"one\" \u{202e}x \n", "", ""), "app-one-x");
        assert_eq!(peer(&format!("# {}\n", "n".repeat(100)), "", "").len(), 64);
        // The comment block right above wins over one inside.
        assert_eq!(peer("#above\n", "", "# inside\n"), "above");
        // A blank line separates a comment from the section below it.
        assert_eq!(peer("# stray\n\n", "", ""), "peer-1");
        // A comment after a key describes that key, not the peer.
        let text = format!("[Peer]\nPublicKey = {KEY_A}\n# late\nAllowedIPs = 10.0.0.1\n");
        let peers = parse_config(&text, "wg0.conf").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(peers[0].name, "peer-1");
        // Config names must not look like addresses, nor be empty.
        assert_eq!(peer("# 10.0.0.1\n", "", ""), "peer-1");
        assert_eq!(peer("#\n", "", ""), "peer-1");
        // A comment that ends the previous peer names the next one.
        let text = format!("[Peer]\nPublicKey = {KEY_A}\n# second\n[Peer]\nPublicKey = {KEY_B}\n");
        let peers = parse_config(&text, "wg0.conf").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (peers[0].name.as_str(), peers[1].name.as_str()),
            ("peer-1", "second")
        );
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            parse_err(&format!(
                "[Interface]\nPrivateKey = {PRIVATE}\n[Peer]\nAllowedIPs = 10.0.0.1\n"
            )),
            (3, Problem::MissingPublicKey)
        );
        assert_eq!(
            parse_err(&format!(
                "[Peer]\nPublicKey = {KEY_A}\nAllowedIPs = 10.0.0.1/32, 10.0.0.0/33\n"
            )),
            (
                3,
                Problem::BadAllowedIp {
                    value: "10.0.0.0/33".into()
                }
            )
        );
        assert_eq!(
            parse_err("\n[Peer]\nPublicKey = abc=\n"),
            (
                3,
                Problem::BadPublicKey {
                    value: "abc=".into()
                }
            )
        );
        assert_eq!(
            parse_err("[Peers]\n"),
            (
                1,
                Problem::UnknownSection {
                    name: "Peers".into()
                }
            )
        );
        assert_eq!(
            parse_err("PublicKey = x\n"),
            (
                1,
                Problem::OutsideSection {
                    key: "PublicKey".into()
                }
            )
        );
        assert_eq!(parse_err("[Interface]\nPrivateKey\n"), (2, Problem::Syntax));
        assert_eq!(parse_err("[Peer\n"), (1, Problem::Syntax));
        assert_eq!(
            parse_err(&format!(
                "[Peer]\nPublicKey = {KEY_A}\n\n[Peer]\nPublicKey = {KEY_A}\n"
            )),
            (
                4,
                Problem::DuplicatePeer {
                    key: KEY_A.into(),
                    first: 1
                }
            )
        );
        let shown = ImportError::Parse {
            origin: "wg0.conf".into(),
            line: 3,
            problem: Problem::MissingPublicKey,
        }
        .to_string();
        assert_eq!(shown, "wg0.conf:3: this [Peer] has no PublicKey");
    }

    #[test]
    fn a_syntax_error_never_shows_a_private_key() {
        let error = parse_config(&format!("[Interface]\nPrivateKey {PRIVATE}\n"), "wg0.conf")
            .expect_err("no `=`");
        assert!(!error.to_string().contains(PRIVATE), "{error}");
    }

    #[test]
    fn reads_a_dump() {
        let dump = format!(
            "{PRIVATE}\t{KEY_C}\t51820\toff\n\
             {KEY_A}\t(none)\t10.77.0.2:51820\t10.100.0.1/32,fd00:100::1/128\t1732250000\t1024\t2048\toff\n\
             {KEY_B}\t(none)\t(none)\t(none)\t0\t0\t0\t25\n"
        );
        let peers = parse_dump(&dump, "wg show wg0 dump").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            peers,
            vec![
                ImportedPeer {
                    name: "peer-1".into(),
                    public_key: KEY_A.into(),
                    allowed_ips: vec![net("10.100.0.1/32"), net("fd00:100::1/128")],
                },
                ImportedPeer {
                    name: "peer-2".into(),
                    public_key: KEY_B.into(),
                    allowed_ips: vec![],
                },
            ]
        );
        assert_eq!(
            parse_dump(&format!("{PRIVATE}\t{KEY_C}\t51820\toff\n"), "x")
                .unwrap_or_else(|e| panic!("{e}")),
            vec![],
            "an interface without peers"
        );
        let error = parse_dump(
            &format!("{PRIVATE}\t{KEY_C}\t51820\toff\n{KEY_A}\t(none)\n"),
            "wg show wg0 dump",
        )
        .expect_err("short line");
        assert_eq!(
            error.to_string(),
            "wg show wg0 dump:2: expected 8 tab-separated fields for a peer, found 2"
        );
        assert!(!error.to_string().contains(PRIVATE));
    }

    #[test]
    fn more_peers_than_a_config_holds_are_refused_at_the_first_one_over() {
        use std::fmt::Write as _;
        let key = |i: usize| format!("{i:0>43}=");
        let file = (0..=MAX_PEERS).fold(String::new(), |mut text, i| {
            let _ = write!(text, "[Peer]\nPublicKey = {}\n", key(i));
            text
        });
        // Two lines a peer: the header of the one over the limit.
        assert_eq!(
            parse_err(&file),
            (
                2 * MAX_PEERS + 1,
                Problem::TooManyPeers { limit: MAX_PEERS }
            )
        );
        let dump: String = std::iter::once(format!("{PRIVATE}\t{KEY_A}\t51820\toff\n"))
            .chain(
                (0..=MAX_PEERS)
                    .map(|i| format!("{}\t(none)\t(none)\t10.0.0.1/32\t0\t0\t0\toff\n", key(i))),
            )
            .collect();
        let error = parse_dump(&dump, "wg show wg0 dump").expect_err("one peer too many");
        assert_eq!(
            error.to_string(),
            format!(
                "wg show wg0 dump:{}: more than 65536 peers; a ztxdp config holds no more \
                 (the kernel peer maps' size)",
                MAX_PEERS + 2
            )
        );
    }

    #[test]
    fn rendered_strings_are_escaped_as_toml_needs() {
        let hostile = "a\"b\\c\nd\u{202e}e\u{7f}";
        let text = format!("v = {}\n", basic_string(hostile));
        let back: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back["v"].as_str(), Some(hostile), "{text}");
        let origin = render(&[], "wg0.conf\n[[tunnel.peer]]", None);
        assert_eq!(
            origin.lines().count(),
            2,
            "a file name ended the comment:\n{origin}"
        );
    }

    #[test]
    fn rendered_entries_are_a_valid_config() {
        let peers = vec![
            ImportedPeer {
                name: "app.one".into(),
                public_key: KEY_A.into(),
                allowed_ips: vec![net("10.100.0.1/32"), net("fd00:100::1/128")],
            },
            ImportedPeer {
                name: "peer-2".into(),
                public_key: KEY_B.into(),
                allowed_ips: vec![net("10.100.1.0/24")],
            },
        ];
        let entries = render(&peers, "wg0.conf", None);
        assert!(
            entries.starts_with("# 2 peer(s) imported from wg0.conf."),
            "{entries}"
        );
        assert_eq!(entries.matches("[[tunnel.peer]]").count(), 2, "{entries}");
        assert_eq!(entries.matches("allow = []").count(), 2, "{entries}");
        let text =
            format!("[audit]\npath = \"/dev/null\"\n\n[tunnel]\ninterface = \"wg0\"\n\n{entries}");
        let config = Config::parse(&text, Path::new("imported.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let tunnel = config.policy.tunnel.expect("a tunnel");
        let back: Vec<ImportedPeer> = tunnel
            .peers
            .iter()
            .map(|p| ImportedPeer {
                name: p.name.clone(),
                public_key: p.public_key.clone().unwrap_or_default(),
                allowed_ips: p.addresses.clone(),
            })
            .collect();
        assert_eq!(back, peers);
        assert!(tunnel.peers.iter().all(|p| p.grants.is_empty()));
        assert_eq!(
            render(&[], "wg show wg0 dump", Some("wg")).lines().count(),
            2,
            "no peers: only the comment, and no group"
        );
        let grouped = render(&peers, "wg0.conf", Some("wg-peers"));
        let text =
            format!("[audit]\npath = \"/dev/null\"\n\n[tunnel]\ninterface = \"wg0\"\n\n{grouped}");
        let config = Config::parse(&text, Path::new("imported.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let groups = config.policy.tunnel.expect("a tunnel").groups;
        assert_eq!(
            groups,
            vec![crate::policy::Group {
                name: "wg-peers".into(),
                members: vec![0, 1],
                grants: Vec::new(),
            }],
            "{grouped}"
        );
    }
}
