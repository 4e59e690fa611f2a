//! Tier 3, the Debian package (issue 14): `cargo xtask package`'s .deb,
//! unpacked into a scratch root with `dpkg -x`. Its file list and modes,
//! its control fields, the installed binary's `--version` and `check` of
//! the shipped config, `up` refusing that config, the unit under
//! `systemd-analyze verify`, and `up` with exactly the unit's capabilities.
//! Needs root and the package: `cargo xtask test` builds it and sets
//! `ZTXDP_DEB` (or run `cargo xtask package` first).

mod e2e;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use e2e::{Daemon, Scratch, run_bounded, ztxdp_cmd};
use zt_tests::netns::NetNs;

/// The package's version: the workspace's, as this crate's.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `ZTXDP_DEB`, else `target/debian/ztxdp_<version>_<arch>.deb`.
fn deb() -> PathBuf {
    let path = std::env::var_os("ZTXDP_DEB").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/debian")
                .join(format!("ztxdp_{VERSION}_{}.deb", arch()))
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "no package at {}: run `cargo xtask package` first, or set ZTXDP_DEB \
         (`cargo xtask test` does both)",
        path.display()
    );
    path
}

fn arch() -> String {
    output(Command::new("dpkg").arg("--print-architecture"))
        .trim()
        .to_owned()
}

/// Runs `command`, which must succeed; returns its stdout.
fn output(command: &mut Command) -> String {
    let out = run_bounded(command);
    assert!(
        out.status.success(),
        "`{}` failed ({}):\n{}",
        zt_tests::netns::describe(command),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The package unpacked, as `dpkg -i` would lay it out (without running
/// its maintainer scripts).
struct Installed {
    deb: PathBuf,
    root: Scratch,
}

impl Installed {
    fn new() -> Self {
        let deb = deb();
        let root = Scratch::new("deb");
        output(Command::new("dpkg").arg("-x").arg(&deb).arg(root.path("")));
        Self { deb, root }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.root.path(file.trim_start_matches('/'))
    }

    fn ztxdp(&self) -> PathBuf {
        self.path("/usr/sbin/ztxdp")
    }

    /// A control field of the package.
    fn field(&self, name: &str) -> String {
        output(Command::new("dpkg-deb").arg("-f").arg(&self.deb).arg(name))
            .trim()
            .to_owned()
    }

    /// Every path in the package with its mode string (`drwxr-x---`).
    fn listing(&self) -> BTreeMap<String, String> {
        output(Command::new("dpkg-deb").arg("-c").arg(&self.deb))
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let path = fields.get(5)?.trim_start_matches('.');
                let path = path.trim_end_matches('/');
                Some((path.to_owned(), (*fields.first()?).to_owned()))
            })
            .collect()
    }
}

#[test]
fn the_package_holds_what_a_service_needs_with_its_modes() {
    let pkg = Installed::new();
    let name = pkg.deb.file_name().and_then(|n| n.to_str()).unwrap_or("");
    assert_eq!(name, format!("ztxdp_{VERSION}_{}.deb", arch()));
    assert_eq!(pkg.field("Package"), "ztxdp");
    assert_eq!(pkg.field("Version"), VERSION, "the workspace version");

    let listing = pkg.listing();
    let mut want = vec![
        ("/usr/sbin/ztxdp", "-rwxr-xr-x"),
        ("/usr/lib/systemd/system/ztxdp.service", "-rw-r--r--"),
        ("/etc/ztxdp/ztxdp.toml", "-rw-r--r--"),
        ("/var/lib/ztxdp", "drwxr-x---"),
        ("/var/log/ztxdp", "drwxr-x---"),
        ("/usr/share/bash-completion/completions/ztxdp", "-rw-r--r--"),
        ("/usr/share/zsh/vendor-completions/_ztxdp", "-rw-r--r--"),
        (
            "/usr/share/fish/vendor_completions.d/ztxdp.fish",
            "-rw-r--r--",
        ),
    ];
    // ztxdp(8) and one page per subcommand.
    let pages = [
        "ztxdp",
        "up",
        "check",
        "status",
        "reload",
        "confirm",
        "down",
        "allow",
        "revoke",
        "list",
        "import-wg",
        "export",
        "export-nft",
        "audit",
        "audit-verify",
        "events",
        "generate",
        "explain",
    ]
    .map(|sub| {
        if sub == "ztxdp" {
            "/usr/share/man/man8/ztxdp.8.gz".to_owned()
        } else {
            format!("/usr/share/man/man8/ztxdp-{sub}.8.gz")
        }
    });
    want.extend(pages.iter().map(|p| (p.as_str(), "-rw-r--r--")));
    for (path, mode) in want {
        assert_eq!(
            listing.get(path).map(String::as_str),
            Some(mode),
            "{path} in the package; it holds:\n{listing:#?}"
        );
    }
    for (path, mode) in &listing {
        assert_ne!(
            mode.as_bytes().get(8),
            Some(&b'w'),
            "{path} is writable by others: {mode}"
        );
    }

    let conffiles = output(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(&pkg.deb)
            .arg("conffiles"),
    );
    assert_eq!(conffiles.trim(), "/etc/ztxdp/ztxdp.toml");

    // Only shared libraries: the binary runs no other program.
    let depends = pkg.field("Depends");
    for dep in depends.split(',').map(str::trim) {
        let name = dep.split_whitespace().next().unwrap_or(dep);
        assert!(
            ["libc6", "libgcc-s1"].contains(&name),
            "Depends names {dep}, which the binary does not need at run time: {depends}"
        );
    }
    assert!(depends.contains("libc6"), "Depends: {depends}");

    // Stripped: no symbol table, no debug info.
    let sections = output(Command::new("readelf").args(["-S", "-W"]).arg(pkg.ztxdp()));
    for section in [".symtab", ".debug_info"] {
        assert!(
            !sections.contains(section),
            "/usr/sbin/ztxdp is not stripped: it has {section}"
        );
    }
}

#[test]
fn the_installed_binary_names_its_build_and_accepts_the_shipped_config() {
    let pkg = Installed::new();
    let version = output(Command::new(pkg.ztxdp()).arg("--version"));
    let lines: Vec<&str> = version.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(format!("ztxdp {VERSION}").as_str())
    );
    let commit = lines
        .get(1)
        .and_then(|l| l.strip_prefix("commit "))
        .unwrap_or("");
    assert!(
        commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "a git commit on the second line of:\n{version}"
    );
    let hash = lines
        .get(2)
        .and_then(|l| l.strip_prefix("bpf sha256 "))
        .unwrap_or("");
    assert!(
        hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "the BPF object's SHA-256 on the third line of:\n{version}"
    );

    let config = pkg.path("/etc/ztxdp/ztxdp.toml");
    let checked = output(
        Command::new(pkg.ztxdp())
            .arg("check")
            .arg("--config")
            .arg(&config),
    );
    assert!(
        checked.contains(": ok (edge: none, tunnel: 0 peers)")
            && checked.contains("nothing to enforce"),
        "`check` of the shipped config:\n{checked}"
    );

    // Installing attaches nothing: `up` refuses the shipped config as it is.
    let ns = NetNs::new("pkg").unwrap_or_else(|e| panic!("{e:?}"));
    let mut up = ns.cmd(pkg.ztxdp());
    up.arg("up").arg("--config").arg(&config);
    let refused = run_bounded(&mut up);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "`up` with the shipped config must refuse it as a config error:\n{stderr}"
    );
    assert!(stderr.contains("nothing to enforce"), "{stderr}");
    let down = output(&mut ztxdp_cmd(&ns, &["down"]));
    assert!(
        down.contains("nothing was attached"),
        "`up` attached something before refusing: {down}"
    );

    // Uncommenting the key lines gives a config that enforces.
    let edited: String = std::fs::read_to_string(&config)
        .unwrap_or_else(|e| panic!("{}: {e}", config.display()))
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(key) if !key.starts_with([' ', '\t']) && !key.is_empty() => format!("{key}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    let edited = pkg.root.write("edited.toml", &edited);
    let checked = output(
        Command::new(pkg.ztxdp())
            .arg("check")
            .arg("--config")
            .arg(&edited),
    );
    assert!(
        checked.contains("ok (edge: eth0, tunnel: 2 peers)") && !checked.contains("note"),
        "the shipped config with its keys uncommented:\n{checked}"
    );
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let pkg = Installed::new();
    let unit = pkg.path("/usr/lib/systemd/system/ztxdp.service");
    // `verify` checks that ExecStart's /usr/sbin/ztxdp is there and that
    // `man` finds the Documentation= pages: the unpacked ones, in a mount
    // namespace of its own, so the host's /usr/sbin is not touched.
    let script = format!(
        "mount -t tmpfs -o mode=0755 ztxdp-sbin /usr/sbin && cp '{}' /usr/sbin/ztxdp && \
         systemd-analyze verify '{}' && systemd-analyze security --offline=true --no-pager '{}'",
        pkg.ztxdp().display(),
        unit.display(),
        unit.display()
    );
    let out = run_bounded(
        Command::new("unshare")
            .args(["--mount", "sh", "-c", &script])
            .env("MANPATH", pkg.path("/usr/share/man")),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify or security failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    let exposure = stdout
        .lines()
        .find_map(|l| l.split("Overall exposure level for ztxdp.service: ").nth(1))
        .unwrap_or_else(|| panic!("no exposure level in:\n{stdout}"));
    // The README states the score; hardening taken out shows here.
    let score: f64 = exposure
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("exposure {exposure:?}"));
    assert!(score <= 4.4, "exposure rose to {exposure}");
}

/// The capabilities `CapabilityBoundingSet=` of the installed unit gives,
/// as setpriv names them (`+bpf,+net_admin`).
fn unit_capabilities(pkg: &Installed) -> String {
    let unit = pkg.path("/usr/lib/systemd/system/ztxdp.service");
    let text = std::fs::read_to_string(&unit).unwrap_or_else(|e| panic!("{}: {e}", unit.display()));
    let caps: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .flat_map(str::split_whitespace)
        .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(
        !caps.is_empty(),
        "no CapabilityBoundingSet= in {}",
        unit.display()
    );
    caps.join(",")
}

#[test]
fn up_runs_with_exactly_the_units_capabilities() {
    let pkg = Installed::new();
    let caps = unit_capabilities(&pkg);
    let ns = NetNs::new("pkgcap").unwrap_or_else(|e| panic!("{e:?}"));
    ns.ip(&["link", "add", "va", "type", "veth", "peer", "name", "vb"])
        .unwrap_or_else(|e| panic!("{e:?}"));
    for link in ["va", "vb"] {
        ns.link_up(link).unwrap_or_else(|e| panic!("{e:?}"));
    }
    let scratch = Scratch::new("pkgcap");
    let config = scratch.write(
        "ztxdp.toml",
        &format!(
            "[edge]\ninterface = \"va\"\nwireguard_ports = [51820]\nssh_allow = []\n\n\
             [audit]\npath = \"{}\"\n",
            scratch.path("audit.jsonl").display()
        ),
    );
    // As systemd starts it: no capability outside the unit's bounding set,
    // none inherited, and no_new_privs (NoNewPrivileges=yes).
    let bounding = format!("--bounding-set=-all,{caps}");
    for round in 1..=2 {
        let mut command = ns.cmd("setpriv");
        command
            .args([
                "--inh-caps=-all",
                "--ambient-caps=-all",
                &bounding,
                "--no-new-privs",
            ])
            .arg(pkg.ztxdp())
            .arg("up")
            .arg("--config")
            .arg(&config)
            .arg("--keep-attached")
            .env_remove("SSH_CONNECTION");
        // The second round replaces the first's programs, which needs
        // finding and opening them by id.
        let daemon = Daemon::spawn(command, scratch.path(&format!("up-{round}.log")));
        let status = output(&mut ztxdp_cmd(&ns, &["status", "--json"]));
        assert!(
            status.contains("\"program\": \"zt_edge\""),
            "round {round}: no edge program in status:\n{status}\nlog:\n{}",
            daemon.log()
        );
        drop(daemon);
    }
    output(&mut ztxdp_cmd(&ns, &["down"]));
}
