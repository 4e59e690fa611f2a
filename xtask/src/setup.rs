//! Installs what the build and the tests need, each step idempotent: it
//! looks first and only changes the machine when something is missing.
use std::{
    collections::HashSet,
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

use crate::cmd::{Progress, ensure_root, output, probe, run};

/// Debian packages: `WireGuard` in user space (no kernel module needed), the
/// BPF and XDP inspection tools, the firewall tools `export nft` and the
/// tests compare against, and what the namespace tests drive.
pub const APT_PACKAGES: &[&str] = &[
    // Text in the benchmark plots.
    "fonts-dejavu-core",
    "wireguard-go",
    "wireguard-tools",
    "bpftool",
    "xdp-tools",
    "nftables",
    "iproute2",
    "ethtool",
    "rsyslog",
    // rsyslog's `ossl` stream driver: the syslog-over-TLS test's collector.
    "rsyslog-openssl",
    "iptables",
    "tcpdump",
    "netcat-openbsd",
    // A real Prometheus (and promtool) scrapes the daemon in the metrics
    // tests; curl asks its HTTP API from inside the lab's namespace.
    "prometheus",
    "curl",
    // `cargo xtask package`: dpkg-shlibdeps for the package's Depends,
    // strip (and readelf, for the package test), and what the package test
    // checks the unit with (`systemd-analyze`, and `man` for its
    // Documentation= pages).
    "dpkg-dev",
    "binutils",
    "systemd",
    "man-db",
];

/// What `cargo xtask vmtest` boots other kernels with: QEMU, and what
/// virtme-ng needs to build its initramfs (a static busybox) and to index
/// the kernel's modules (depmod, in kmod).
pub const VM_APT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod"];

/// virtme-ng, which boots a kernel with this machine's root shared
/// read-only. Pinned to the version `cargo xtask vmtest` was tried with:
/// its command line and guest init change between releases.
const VIRTME_NG: &str = "virtme-ng==1.42";

pub fn apt_packages(progress: &Progress) -> anyhow::Result<String> {
    let missing = missing_packages(APT_PACKAGES)?;
    if missing.is_empty() {
        return Ok(format!("all {} already present", APT_PACKAGES.len()));
    }
    apt_install(progress, &missing, None)?;
    Ok(format!("installed {}", missing.join(" ")))
}

/// [`VM_APT_PACKAGES`], then virtme-ng (pip) in its own virtualenv
/// `venv` (under target/: nothing of it leaks into the system's Python).
pub fn vm_tools(progress: &Progress, venv: &Path) -> anyhow::Result<String> {
    let mut notes = Vec::new();
    let missing = missing_packages(VM_APT_PACKAGES)?;
    if missing.is_empty() {
        notes.push(format!("{} already present", VM_APT_PACKAGES.join(", ")));
    } else {
        notes.push(install_qemu(progress, &missing)?);
    }
    notes.push(virtme_ng(progress, venv)?);
    Ok(notes.join("; "))
}

/// Installs `missing` from the distribution's own suites, never removing a
/// package (`--no-remove`). That fails where a newer qemu-utils from
/// backports is installed, which breaks the distribution's QEMU: then QEMU
/// comes from the same backports suite, which matches it.
fn install_qemu(progress: &Progress, missing: &[&str]) -> anyhow::Result<String> {
    let Err(error) = apt_install(progress, missing, None) else {
        return Ok(format!("installed {}", missing.join(" ")));
    };
    let codename = os_release_codename()?;
    let suite = format!("{codename}-backports");
    progress.say(format!(
        "apt refused ({error:#}); trying {suite}, whose QEMU matches a qemu-utils installed from there"
    ));
    // An extra sources list for these apt runs only: the system's own
    // configuration stays as it is.
    let list = std::env::temp_dir().join(format!("xtask-{suite}-{}.list", std::process::id()));
    let text = format!(
        "{}\ndeb http://deb.debian.org/debian {suite} main\n",
        fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()
    );
    fs::write(&list, text).with_context(|| format!("could not write {}", list.display()))?;
    let installed = apt_install(
        progress,
        missing,
        Some(&Backports {
            list: &list,
            suite: &suite,
        }),
    );
    let _ = fs::remove_file(&list);
    installed.with_context(|| {
        format!(
            "could not install {} from {codename} nor from {suite}; install QEMU \
             (qemu-system-x86_64) by hand",
            missing.join(" ")
        )
    })?;
    Ok(format!("installed {} from {suite}", missing.join(" ")))
}

/// A backports suite to install from: a sources list that names it, used
/// for one apt run, and the suite to prefer.
struct Backports<'a> {
    list: &'a Path,
    suite: &'a str,
}

/// `apt-get update`, then `apt-get install` of `packages`, never removing
/// one: apt stops instead, before it changes anything.
fn apt_install(
    progress: &Progress,
    packages: &[&str],
    backports: Option<&Backports>,
) -> anyhow::Result<()> {
    progress.say(format!("installing {} ...", packages.join(" ")));
    ensure_root(&format!(
        "installing the Debian packages {}",
        packages.join(" ")
    ))?;
    let mut update = Command::new("apt-get");
    let mut install = Command::new("apt-get");
    if let Some(backports) = backports {
        let list = format!("Dir::Etc::sourcelist={}", backports.list.display());
        update.args(["-o", &list]);
        install.args(["-o", &list, "-t", backports.suite]);
    }
    run(update.arg("update"))
        .context("apt-get update failed: check the network and /etc/apt/sources.list")?;
    run(install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends", "--no-remove"])
        .args(packages))
    .with_context(|| format!("could not install {}", packages.join(" ")))
}

/// `VERSION_CODENAME` from /etc/os-release: `bookworm`.
fn os_release_codename() -> anyhow::Result<String> {
    let text = fs::read_to_string("/etc/os-release")
        .context("could not read /etc/os-release to find the Debian release")?;
    text.lines()
        .find_map(|line| line.strip_prefix("VERSION_CODENAME="))
        .map(|value| value.trim_matches('"').to_owned())
        .filter(|codename| !codename.is_empty())
        .ok_or_else(|| anyhow!("/etc/os-release names no VERSION_CODENAME"))
}

/// `venv/bin/vng`, installed with pip into `venv` when it does not run.
fn virtme_ng(progress: &Progress, venv: &Path) -> anyhow::Result<String> {
    let vng = venv.join("bin").join("vng");
    if let Some(version) = probe(Command::new(&vng).arg("--version")) {
        return Ok(format!("{} already present", version.trim()));
    }
    progress.say(format!(
        "installing {VIRTME_NG} into {} ...",
        venv.display()
    ));
    run(Command::new("python3").arg("-m").arg("venv").arg(venv)).context(
        "could not create a Python virtualenv for virtme-ng: install python3 and python3-venv",
    )?;
    run(Command::new(venv.join("bin").join("pip")).args(["install", "--quiet", VIRTME_NG]))
        .with_context(|| format!("could not install {VIRTME_NG} from PyPI"))?;
    let version = probe(Command::new(&vng).arg("--version"))
        .ok_or_else(|| anyhow!("{} does not run after installing it", vng.display()))?;
    Ok(format!("installed {}", version.trim()))
}

/// The packages of `wanted` that dpkg does not report as installed.
fn missing_packages<'a>(wanted: &[&'a str]) -> anyhow::Result<Vec<&'a str>> {
    let installed = installed_packages(wanted)?;
    Ok(wanted
        .iter()
        .copied()
        .filter(|package| !installed.contains(*package))
        .collect())
}

/// The subset of `packages` that dpkg reports as installed.
fn installed_packages(packages: &[&str]) -> anyhow::Result<HashSet<String>> {
    let mut query = Command::new("dpkg-query");
    query
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(packages);
    crate::cmd::echo(&query);
    // Exit status 1 only means some package is unknown to dpkg; stdout still
    // lists the others.
    let result = query.output().context(
        "could not run dpkg-query: `cargo xtask` installs system packages with apt (Debian/Ubuntu); \
         elsewhere install the equivalents of these by hand",
    )?;
    Ok(String::from_utf8_lossy(&result.stdout)
        .lines()
        .filter(|line| line.ends_with(" install ok installed"))
        .filter_map(|line| line.split_whitespace().next())
        // Multi-arch packages print as `name:amd64`.
        .map(|package| package.split(':').next().unwrap_or(package).to_owned())
        .collect())
}

pub fn rust_src(progress: &Progress) -> anyhow::Result<String> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to manage the nightly toolchain the BPF build uses: install it from https://rustup.rs")?;
    if !toolchains.lines().any(is_plain_nightly) {
        bail!(
            "no nightly Rust toolchain: the BPF programs are built with nightly. Install it with \
             `rustup toolchain install nightly --component rust-src` and run this again"
        );
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if components.lines().any(|line| line.trim() == "rust-src") {
        return Ok("already present".to_owned());
    }
    progress.say("installing rust-src for nightly ...");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    Ok("installed".to_owned())
}

/// `nightly-x86_64-unknown-linux-gnu (...)`, not a dated `nightly-2025-...`,
/// which `--toolchain nightly` does not select.
fn is_plain_nightly(line: &str) -> bool {
    line.strip_prefix("nightly-")
        .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

pub fn bpf_linker(progress: &Progress) -> anyhow::Result<String> {
    if let Some(version) = probe(Command::new("bpf-linker").arg("--version")) {
        return Ok(format!("{} already present", version.trim()));
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let (library, major) = rustc_llvm(&lib_dir)?;
    let prefix = llvm_prefix()?;
    link_llvm(&prefix.join("lib"), &library)?;
    progress.say(format!(
        "building bpf-linker against nightly rustc's own LLVM {major} (1-2 minutes) ..."
    ));
    run(Command::new("cargo")
        .env("LLVM_PREFIX", &prefix)
        .args([
            "+nightly",
            "install",
            "--locked",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}")))
    .context("building bpf-linker failed; its output is above")?;
    let version = probe(Command::new("bpf-linker").arg("--version")).ok_or_else(|| {
        anyhow!("bpf-linker was installed but does not run from PATH: add $CARGO_HOME/bin (usually ~/.cargo/bin) to PATH")
    })?;
    Ok(format!("built {}", version.trim()))
}

/// The shared LLVM library shipped with rustc (`libLLVM.so.22.1-rust-...`)
/// and its major version. The sysroot also holds `libLLVM-22-rust-...so`, a
/// linker script, which is not the library.
fn rustc_llvm(lib_dir: &Path) -> anyhow::Result<(PathBuf, u32)> {
    let entries = fs::read_dir(lib_dir)
        .with_context(|| format!("could not list {} (nightly's sysroot)", lib_dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("could not list {}", lib_dir.display()))?;
        let name = entry.file_name();
        let Some(major) = name.to_str().and_then(llvm_major) else {
            continue;
        };
        if entry.path().is_file() {
            return Ok((entry.path(), major));
        }
    }
    bail!(
        "no libLLVM.so.* in {}: this nightly does not ship LLVM as a shared library; \
         install bpf-linker another way (see https://github.com/aya-rs/bpf-linker#installation)",
        lib_dir.display()
    )
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> 22.
fn llvm_major(file_name: &str) -> Option<u32> {
    let version = file_name.strip_prefix("libLLVM.so.")?;
    let end = version
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(version.len());
    version[..end].parse().ok()
}

/// bpf-linker's build script reads `$LLVM_PREFIX/lib` and records it as the
/// binary's RUNPATH, so the directory must outlive this checkout's target/
/// (a fresh clone or `cargo clean` would otherwise break the installed
/// linker): it lives beside the installed binaries.
fn llvm_prefix() -> anyhow::Result<PathBuf> {
    let cargo_home = match std::env::var_os("CARGO_HOME") {
        Some(home) => PathBuf::from(home),
        None => PathBuf::from(
            std::env::var_os("HOME")
                .ok_or_else(|| anyhow!("neither CARGO_HOME nor HOME is set"))?,
        )
        .join(".cargo"),
    };
    Ok(cargo_home.join("ztxdp-llvm-prefix"))
}

/// `libLLVM.so` (what the linker looks for) and the library's own name
/// (its soname, what the loader looks for), both pointing at `library`.
fn link_llvm(dir: &Path, library: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    let own_name = library
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", library.display()))?;
    for link in [dir.join("libLLVM.so"), dir.join(own_name)] {
        match fs::remove_file(&link) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("could not replace {}", link.display()));
            }
        }
        std::os::unix::fs::symlink(library, &link).with_context(|| {
            format!("could not link {} -> {}", link.display(), library.display())
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_reads_only_the_shared_library_name() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM.so.19"), Some(19));
        assert_eq!(
            llvm_major("libLLVM-22-rust-1.97.0-nightly.so"),
            None,
            "the linker script"
        );
        assert_eq!(llvm_major("librustc_driver-b5a965480ee51f9a.so"), None);
    }

    #[test]
    fn only_undated_nightly_counts() {
        assert!(is_plain_nightly("nightly-x86_64-unknown-linux-gnu"));
        assert!(is_plain_nightly(
            "nightly-x86_64-unknown-linux-gnu (active)"
        ));
        assert!(!is_plain_nightly(
            "nightly-2025-01-01-x86_64-unknown-linux-gnu"
        ));
        assert!(!is_plain_nightly(
            "stable-x86_64-unknown-linux-gnu (default)"
        ));
    }
}
