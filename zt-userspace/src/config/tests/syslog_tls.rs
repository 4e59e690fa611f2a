//! `[audit.syslog]` with TLS: the keys, and the files they name, read and
//! checked when the config is.

use std::fs;

use rustls::pki_types::ServerName;

use super::*;
use crate::audit::{syslog::tls::tests::TestCa, writer::tests::TempDir};

/// PEM files in a scratch directory: a CA, a client certificate from it
/// with its key, and a key of another certificate.
struct Files {
    dir: TempDir,
}

impl Files {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let ca = TestCa::new("syslog CA");
        let (cert, key) = ca.issue(&["ztxdp.example"]);
        let (_, other_key) = ca.issue(&["other.example"]);
        for (name, text) in [
            ("ca.pem", ca.pem()),
            ("client.pem", cert.pem()),
            ("client.key", key.serialize_pem()),
            ("other.key", other_key.serialize_pem()),
            ("notes.txt", "not a certificate\n".to_owned()),
            ("cut.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n".to_owned()),
        ] {
            fs::write(dir.0.join(name), text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.0.join(name).display().to_string()
    }

    /// `tls = true` (line 10) and `ca_file` (line 11) naming `ca`, then `more`.
    fn tls(&self, ca: &str, more: &str) -> String {
        syslog_config(&format!(
            "tls = true\nca_file = \"{}\"\n{more}",
            self.path(ca)
        ))
    }
}

/// The config with `[audit.syslog]` at line 8 holding `lines` from line 10.
fn syslog_config(lines: &str) -> String {
    format!(
        "{}[audit.syslog]\naddress = \"127.0.0.1:6514\"\n{lines}\n",
        edge_with("")
    )
}

#[test]
fn tls_keys_read_their_files() {
    let f = Files::new("tls-keys");
    let plain = parse_ok(&syslog_config(""))
        .policy
        .audit
        .syslog
        .expect("syslog");
    assert_eq!(plain.tls, None, "plain TCP unless tls = true");
    let anchored = parse_ok(&f.tls("ca.pem", ""))
        .policy
        .audit
        .syslog
        .expect("syslog");
    let tls = anchored.tls.expect("tls");
    assert_eq!(tls.ca_file, f.dir.0.join("ca.pem"));
    assert_eq!(tls.client_files, None);
    assert_eq!(
        tls.server_name,
        ServerName::try_from("127.0.0.1").expect("address"),
        "by default the collector's certificate must be for the host of the address"
    );
    let full = parse_ok(&f.tls(
        "ca.pem",
        &format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\nserver_name = \"collector.example\"",
            f.path("client.pem"),
            f.path("client.key")
        ),
    ));
    let tls = full.policy.audit.syslog.and_then(|s| s.tls).expect("tls");
    assert_eq!(
        tls.client_files,
        Some((f.dir.0.join("client.pem"), f.dir.0.join("client.key")))
    );
    assert_eq!(
        tls.server_name,
        ServerName::try_from("collector.example").expect("name")
    );
    let off = parse_ok(&syslog_config("tls = false"));
    assert_eq!(off.policy.audit.syslog.and_then(|s| s.tls), None);
}

#[test]
fn bad_tls_keys_and_files_are_named() {
    let f = Files::new("tls-bad");
    let shown = expect_error(&syslog_config("tls = true"), "audit.syslog.ca_file", 8);
    assert!(shown.contains("missing"), "{shown}");
    for (ca, says) in [
        ("absent.pem", "cannot read"),
        ("notes.txt", "holds no certificate"),
        ("client.key", "holds no certificate"),
        ("cut.pem", "is not PEM"),
    ] {
        let shown = expect_error(&f.tls(ca, ""), "audit.syslog.ca_file", 11);
        assert!(shown.contains(says), "{ca}: {shown}");
    }
    let cert = format!("cert_file = \"{}\"", f.path("client.pem"));
    let key = |name: &str| format!("key_file = \"{}\"", f.path(name));
    let shown = expect_error(&f.tls("ca.pem", &cert), "audit.syslog.key_file", 8);
    assert!(shown.contains("missing"), "{shown}");
    expect_error(
        &f.tls("ca.pem", &key("client.key")),
        "audit.syslog.cert_file",
        8,
    );
    for (name, says) in [
        ("client.pem", "holds no private key"),
        ("notes.txt", "holds no private key"),
        ("absent.key", "cannot read"),
    ] {
        let shown = expect_error(
            &f.tls("ca.pem", &format!("{cert}\n{}", key(name))),
            "audit.syslog.key_file",
            13,
        );
        assert!(shown.contains(says), "{name}: {shown}");
    }
    let shown = expect_error(
        &f.tls("ca.pem", &format!("{cert}\n{}", key("other.key"))),
        "audit.syslog.key_file",
        13,
    );
    assert!(shown.contains("does not go with"), "{shown}");
    let not_pem = format!(
        "cert_file = \"{}\"\n{}",
        f.path("notes.txt"),
        key("client.key")
    );
    expect_error(&f.tls("ca.pem", &not_pem), "audit.syslog.cert_file", 12);
    expect_error(
        &f.tls("ca.pem", "server_name = \"not a name\""),
        "audit.syslog.server_name",
        12,
    );
    expect_error(&syslog_config("tls = \"yes\""), "audit.syslog.tls", 10);
    // Without tls = true these keys would be ignored, and the records sent
    // in clear text to someone who meant them encrypted.
    for (stray, key, line) in [
        (format!("ca_file = \"{}\"", f.path("ca.pem")), "ca_file", 10),
        (
            "tls = false\nserver_name = \"collector.example\"".to_owned(),
            "server_name",
            11,
        ),
        (key("client.key"), "key_file", 10),
    ] {
        let shown = expect_error(&syslog_config(&stray), &format!("audit.syslog.{key}"), line);
        assert!(shown.contains("tls = true"), "{shown}");
    }
}
