//! Builds the BPF programs in `zt-ebpf` with aya-build (nightly toolchain and
//! bpf-linker, both installed by `cargo xtask`) and leaves the object in
//! `OUT_DIR`, where `src/lib.rs` embeds it.
//!
//! It also names the build, for `ztxdp --version` and the identity file
//! (`src/build_info.rs`): `ZTXDP_GIT_COMMIT`, the commit checked out (or
//! `unknown` outside a git checkout), and `ZTXDP_BPF_SHA256`, the hash of
//! the object embedded.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow};
use sha2::{Digest as _, Sha256};

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    // zt-ebpf sits beside this crate in the workspace.
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", manifest_dir.display()))?
        .join("zt-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "zt-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    let object = out_dir.join("zt-ebpf");
    let bytes = std::fs::read(&object)
        .with_context(|| format!("reading the BPF object {}", object.display()))?;
    let mut hex = String::with_capacity(64);
    for byte in Sha256::digest(&bytes) {
        let _ = write!(hex, "{byte:02x}");
    }
    println!("cargo:rustc-env=ZTXDP_BPF_SHA256={hex}");
    println!(
        "cargo:rustc-env=ZTXDP_GIT_COMMIT={}",
        git_commit(&manifest_dir)
    );
    Ok(())
}

/// The commit checked out, with the files that move when it changes
/// registered for a rebuild; `unknown` when this is no git checkout.
fn git_commit(dir: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
    };
    // HEAD, the branch it points at, and packed-refs (where a branch may
    // live instead): a commit or checkout changes one of them. A worktree
    // has its own HEAD, so ask git where each is. A path that does not
    // exist would make cargo run this script on every build.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for name in ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref()) {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", name])
            && Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
}
