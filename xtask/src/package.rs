//! `cargo xtask package`: a release `ztxdp` and its Debian package,
//! `target/debian/ztxdp_<version>_<arch>.deb`, built with cargo-deb from
//! `[package.metadata.deb]` in zt-userspace/Cargo.toml.
//!
//! What the package ships besides the binary and the unit is made here,
//! never by hand: the man pages and completions by `ztxdp generate` (from
//! the clap definitions), the config from `examples/ztxdp.toml` with its
//! edge and tunnel commented out.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    cmd::{Progress, probe, run},
    target_dir, workspace_root,
};

/// Where the assets that `[package.metadata.deb]` lists under
/// `target/release/package/` are written.
fn assets_dir() -> PathBuf {
    target_dir().join("release").join("package")
}

/// The tables of the example that attach something: commented out in the
/// packaged config, so that installing attaches nothing.
const ENFORCING_TABLES: &[&str] = &[
    "[edge]",
    "[[edge.service]]",
    "[tunnel]",
    "[[tunnel.peer]]",
    "[[tunnel.group]]",
];

/// What the packaged config says first.
const CONFIG_HEADER: &str = "\
# Installed by the ztxdp package. Nothing is enforced until you uncomment
# and edit [edge], [tunnel] or both below (a key line starts with `#` and
# no space): `ztxdp check` accepts this file as it is, and `ztxdp up` (the
# ztxdp service) refuses it with \"nothing to enforce\". Then:
#   ztxdp check --config /etc/ztxdp/ztxdp.toml && systemctl enable --now ztxdp
#
";

/// cargo-deb, installed once per machine like bpf-linker.
pub fn cargo_deb(progress: &Progress) -> anyhow::Result<String> {
    if let Some(version) = probe(Command::new("cargo").args(["deb", "--version"])) {
        return Ok(format!("{} already present", version.trim()));
    }
    progress.say("building cargo-deb (1-2 minutes) ...");
    run(Command::new("cargo").args(["install", "--locked", "cargo-deb", "--version", "^3"]))
        .context("installing cargo-deb failed; its output is above")?;
    let version = probe(Command::new("cargo").args(["deb", "--version"]))
        .context("cargo-deb was installed but `cargo deb` does not run: add $CARGO_HOME/bin (usually ~/.cargo/bin) to PATH")?;
    Ok(format!("built {}", version.trim()))
}

/// The release binary.
pub fn build_release(_: &Progress) -> anyhow::Result<String> {
    run(crate::cargo().args(["build", "--release", "-p", "zt-userspace", "--bin", "ztxdp"]))?;
    Ok(format!("{}", release_bin().display()))
}

fn release_bin() -> PathBuf {
    target_dir().join("release").join("ztxdp")
}

/// Writes the assets, runs cargo-deb, and adds the state directories.
/// Returns the package's path.
pub fn deb(progress: &Progress) -> anyhow::Result<PathBuf> {
    let assets = assets_dir();
    if assets.exists() {
        fs::remove_dir_all(&assets)
            .with_context(|| format!("could not clear {}", assets.display()))?;
    }
    run(Command::new(release_bin())
        .args(["generate", "--out"])
        .arg(&assets))?;
    let man = assets.join("man");
    let mut pages: Vec<PathBuf> = fs::read_dir(&man)
        .with_context(|| format!("could not list {}", man.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("could not list {}", man.display()))?;
    pages.sort();
    // Debian compresses man pages; -n leaves name and time out, so the
    // same page gives the same bytes.
    run(Command::new("gzip").args(["-9nf"]).args(&pages))?;
    let example = workspace_root().join("examples").join("ztxdp.toml");
    let text = fs::read_to_string(&example)
        .with_context(|| format!("could not read {}", example.display()))?;
    let config = assets.join("ztxdp.toml");
    fs::write(&config, packaged_config(&text))
        .with_context(|| format!("could not write {}", config.display()))?;

    let out = target_dir().join("debian");
    let built = crate::cmd::output(
        crate::cargo()
            .args(["deb", "-p", "zt-userspace", "--no-build", "--output"])
            .arg(&out),
    )?;
    // cargo-deb prints the package's path last.
    let deb = PathBuf::from(built.lines().last().unwrap_or_default().trim());
    if !deb.is_file() {
        bail!("cargo deb said it wrote {built:?}, which is no file");
    }
    add_state_dirs(&deb, progress)?;
    Ok(deb)
}

/// The example config with the tables that attach something commented
/// out, key by key (`#key = value`, no space), under [`CONFIG_HEADER`].
fn packaged_config(example: &str) -> String {
    let mut out = String::from(CONFIG_HEADER);
    let mut enforcing = false;
    for line in example.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            enforcing = ENFORCING_TABLES.contains(&trimmed.trim_end());
        }
        if enforcing && !trimmed.is_empty() && !trimmed.starts_with('#') {
            out.push('#');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// cargo-deb makes every directory 0755 and ships no empty one, so the
/// state and log directories (0750: the grants and the trail are not for
/// everyone) are added to its package with dpkg-deb.
fn add_state_dirs(deb: &Path, progress: &Progress) -> anyhow::Result<()> {
    let tree = target_dir().join("debian").join("tree");
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("could not clear {}", tree.display()))?;
    }
    run(Command::new("dpkg-deb")
        .arg("--raw-extract")
        .arg(deb)
        .arg(&tree))?;
    for dir in ["var/lib/ztxdp", "var/log/ztxdp"] {
        run(Command::new("install")
            .args(["-d", "-m", "0750"])
            .arg(tree.join(dir)))?;
    }
    progress.say("adding /var/lib/ztxdp and /var/log/ztxdp (0750)");
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&tree)
        .arg(deb))?;
    fs::remove_dir_all(&tree).with_context(|| format!("could not remove {}", tree.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_config_comments_out_what_attaches() {
        let example = "# intro\n[edge]\ninterface = \"eth0\"\n# why\nssh_port = 22\n\n\
                       [[tunnel.peer]]\nname = \"a\"\n\n[flows]\nmax_entries = 65536\n\
                       [audit]\npath = \"/var/log/ztxdp/audit.jsonl\"\n";
        let packaged = packaged_config(example);
        let body = packaged
            .strip_prefix(CONFIG_HEADER)
            .expect("the header first");
        assert_eq!(
            body,
            "# intro\n#[edge]\n#interface = \"eth0\"\n# why\n#ssh_port = 22\n\n\
             #[[tunnel.peer]]\n#name = \"a\"\n\n[flows]\nmax_entries = 65536\n\
             [audit]\npath = \"/var/log/ztxdp/audit.jsonl\"\n"
        );
    }
}
