//! `cargo xtask vmtest`: the programs on the kernels users run. Boots
//! Debian's own kernel images under QEMU with virtme-ng, this machine's root
//! shared read-only, and runs `xtask vm-guest` inside each (see
//! [`crate::vm_guest`]): a tier-3 smoke by default, tier 2 too with `--full`.
//!
//! The guest writes only into its own output folder under
//! target/vmtest/runs/ (virtme-ng's `--rwdir`); its namespaces, programs and
//! traffic live and die inside the VM.
use std::{
    env,
    fs::{self, File},
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use crate::{
    Steps,
    cmd::{self, Progress, echo, show},
    setup,
};

/// A kernel series users run, and how Debian names its image packages:
/// `PREFIX<number>SUFFIX`, the newest being the highest number.
struct Series {
    label: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

/// Debian 12's stock kernel and its 6.12 kernel (bookworm-security).
const SERIES: [Series; 2] = [
    Series {
        label: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64",
    },
    Series {
        label: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64",
    },
];

/// What `vng --cpus` and `--memory` give each guest: two CPUs, as CI has,
/// so the tests' parallelism matches.
const GUEST_CPUS: &str = "2";
const GUEST_MEMORY: &str = "2G";
/// Where `/dev/kvm` exists but boots only specially built guests (nested
/// setups), a stock kernel prints its loader's first line ("Probing EDD")
/// and then nothing: this much silence before user space, then TCG. A
/// kernel under KVM prints its next line within milliseconds.
const KVM_SILENCE: Duration = Duration::from_secs(10);
/// The same when not even that line comes: vng needs a few seconds to
/// build its initramfs first.
const KVM_BOOT_TIMEOUT: Duration = Duration::from_mins(1);
/// Bounds of a whole guest run, for a loaded machine without KVM: the smoke
/// takes about 35 s under TCG, tier 2 about 6 minutes.
const SMOKE_TIMEOUT: Duration = Duration::from_mins(5);
const FULL_TIMEOUT: Duration = Duration::from_mins(30);
/// Console lines kept for an error message.
const CONSOLE_TAIL: usize = 40;

/// What the guests run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// The tier-3 smoke.
    Smoke,
    /// The smoke and every tier-2 test binary.
    Full,
}

/// How QEMU runs the guest.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Accel {
    Kvm,
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kvm => "KVM",
            Self::Tcg => "TCG",
        })
    }
}

/// A kernel image extracted under target/vmtest/kernels/.
struct Kernel {
    label: &'static str,
    /// `uname -r` of the kernel: `6.1.0-57-amd64`.
    release: String,
    image: PathBuf,
}

/// The steps `cargo xtask vmtest` adds after the build, also run by
/// `cargo xtask test` (with [`Suite::Smoke`]); their number is
/// [`step_count`].
///
/// # Errors
/// When a tool cannot be installed, a kernel cannot be downloaded, or a
/// guest fails; every kernel is tried before the first failure is returned.
pub fn steps(steps: &mut Steps, suite: Suite, ztxdp: &Path) -> anyhow::Result<()> {
    let dir = crate::target_dir().join("vmtest");
    let venv = dir.join("venv");
    steps.run("vm tools", |progress| setup::vm_tools(progress, &venv))?;
    let mut kernels = Vec::new();
    steps.run("kernels", |progress| {
        kernels = fetch_kernels(progress, &dir.join("kernels"))?;
        Ok(kernels
            .iter()
            .map(|k| k.release.as_str())
            .collect::<Vec<_>>()
            .join(", "))
    })?;
    let mut tests = Vec::new();
    if suite == Suite::Full {
        steps.run("tier-2 binaries", |_| {
            tests = tier2_binaries()?;
            Ok(format!("{} test binaries", tests.len()))
        })?;
    }
    let guest = Guest {
        vng: venv.join("bin").join("vng"),
        xtask: xtask_bin()?,
        ztxdp: ztxdp.to_owned(),
        tests,
        timeout: match suite {
            Suite::Smoke => SMOKE_TIMEOUT,
            Suite::Full => FULL_TIMEOUT,
        },
    };
    let mut accel = if kvm_usable() { Accel::Kvm } else { Accel::Tcg };
    let mut first_error = None;
    for kernel in &kernels {
        let run_dir = dir.join("runs").join(kernel.label);
        let result = steps.run(&format!("vm {}", kernel.label), |progress| {
            guest.run(kernel, &run_dir, &mut accel, progress)
        });
        if let Err(error) = result {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The xtask binary the build step left: the one running may have been
/// replaced by it (`cargo xtask` builds the workspace, xtask included).
fn xtask_bin() -> anyhow::Result<PathBuf> {
    let path = crate::target_dir().join("debug").join("xtask");
    if !path.is_file() {
        bail!(
            "{} is missing: `cargo build` did not produce it",
            path.display()
        );
    }
    Ok(path)
}

/// How many steps [`steps`] runs.
pub fn step_count(suite: Suite) -> usize {
    let tier2 = usize::from(suite == Suite::Full);
    2 + tier2 + SERIES.len()
}

/// Whether KVM can be tried: `/dev/kvm` opens for reading and writing.
fn kvm_usable() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The newest image of every [`SERIES`], downloaded and extracted unless
/// already there. A package in apt's lists that the mirror no longer has
/// (the lists are old) is tried again after `apt-get update`.
fn fetch_kernels(progress: &Progress, dir: &Path) -> anyhow::Result<Vec<Kernel>> {
    match SERIES
        .iter()
        .map(|series| fetch(progress, dir, series))
        .collect()
    {
        Ok(kernels) => Ok(kernels),
        Err(error) => {
            progress.say(format!(
                "{error:#}; updating apt's package lists and trying again"
            ));
            cmd::ensure_root("updating apt's package lists")?;
            cmd::run(Command::new("apt-get").arg("update"))
                .context("apt-get update failed: check the network and apt's sources")?;
            SERIES
                .iter()
                .map(|series| fetch(progress, dir, series))
                .collect()
        }
    }
}

fn fetch(progress: &Progress, dir: &Path, series: &Series) -> anyhow::Result<Kernel> {
    let names = cmd::output(Command::new("apt-cache").args(["pkgnames", series.prefix]))
        .context("could not list kernel packages with apt-cache (a Debian machine is needed)")?;
    let package = newest(names.lines(), series).ok_or_else(|| {
        anyhow!(
            "apt knows no {}N{} package: the kernel {} cannot be tested. \
             Debian 12 (bookworm) with bookworm-security in apt's sources has it",
            series.prefix,
            series.suffix,
            series.label
        )
    })?;
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_owned();
    let root = dir.join(&package);
    let image = root.join("boot").join(format!("vmlinuz-{release}"));
    if image.is_file() {
        progress.say(format!("{package} already extracted in {}", root.display()));
    } else {
        download(progress, dir, &package, &root)?;
        if !image.is_file() {
            bail!(
                "{package} has no {}: not a kernel image package?",
                image.display()
            );
        }
    }
    prune(dir, series, &package)?;
    Ok(Kernel {
        label: series.label,
        release,
        image,
    })
}

/// `apt-get download`, then `dpkg-deb -x` into a scratch folder renamed to
/// `root` only once complete, so an interrupted run leaves no half kernel.
fn download(progress: &Progress, dir: &Path, package: &str, root: &Path) -> anyhow::Result<()> {
    let downloads = dir.join("downloads");
    // Leftovers of an interrupted run.
    remove_dir(&downloads)?;
    fs::create_dir_all(&downloads)
        .with_context(|| format!("could not create {}", downloads.display()))?;
    progress.say(format!("downloading {package} (about 70 MB) ..."));
    cmd::run(
        Command::new("apt-get")
            .args(["download", package])
            .current_dir(&downloads),
    )
    .with_context(|| format!("could not download {package} with apt-get"))?;
    let deb = fs::read_dir(&downloads)
        .with_context(|| format!("could not list {}", downloads.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .ok_or_else(|| anyhow!("apt-get download left no .deb in {}", downloads.display()))?;
    let scratch = downloads.join("root");
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&scratch))
        .with_context(|| format!("could not extract {}", deb.display()))?;
    fs::rename(&scratch, root)
        .with_context(|| format!("could not move {} to {}", scratch.display(), root.display()))?;
    remove_dir(&downloads)
}

/// Removes the older images of `series` (400 MB each extracted).
fn prune(dir: &Path, series: &Series, keep: &str) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("could not list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("could not list {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name != keep && number(name, series).is_some() {
            remove_dir(&entry.path())?;
        }
    }
    Ok(())
}

fn remove_dir(path: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("could not remove {}", path.display())),
    }
}

/// The package of `series` with the highest number among `names`.
fn newest<'a>(names: impl Iterator<Item = &'a str>, series: &Series) -> Option<String> {
    names
        .map(str::trim)
        .filter_map(|name| number(name, series).map(|n| (n, name)))
        .max_by_key(|&(n, _)| n)
        .map(|(_, name)| name.to_owned())
}

/// `57` for `linux-image-6.1.0-57-amd64`; `None` for other names, such as
/// the `-rt-amd64`, `-cloud-amd64` and `-unsigned` flavours.
fn number(name: &str, series: &Series) -> Option<u32> {
    let middle = name
        .strip_prefix(series.prefix)?
        .strip_suffix(series.suffix)?;
    if middle.is_empty() || !middle.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    middle.parse().ok()
}

/// The tier-2 test binaries, built on the host (a guest without KVM would
/// take many times longer to compile them).
fn tier2_binaries() -> anyhow::Result<Vec<PathBuf>> {
    let listing = cmd::output(crate::cargo().args([
        "test",
        "-p",
        "zt-tests",
        "--test",
        "tier2_*",
        "--no-run",
        "--message-format=json",
    ]))
    .context("could not build the tier-2 tests")?;
    let tests: Vec<PathBuf> = listing
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["kind"][0] == "test")
        .filter_map(|message| message["executable"].as_str().map(PathBuf::from))
        .collect();
    if tests.is_empty() {
        bail!("`cargo test --no-run` built no tier2_* test binary");
    }
    Ok(tests)
}

/// What every guest gets.
struct Guest {
    vng: PathBuf,
    xtask: PathBuf,
    ztxdp: PathBuf,
    /// Tier-2 test binaries; none for the smoke alone.
    tests: Vec<PathBuf>,
    timeout: Duration,
}

/// How one boot ended.
enum Boot {
    /// The guest ran and wrote a result.
    Ran(Result<String, String>),
    /// Under KVM, user space never started.
    KvmHung,
}

impl Guest {
    /// Boots `kernel` and returns the guest's note, falling back to TCG
    /// for good (`accel`) when KVM hangs.
    fn run(
        &self,
        kernel: &Kernel,
        run_dir: &Path,
        accel: &mut Accel,
        progress: &Progress,
    ) -> anyhow::Result<String> {
        let start = Instant::now();
        let outcome = loop {
            let boot = self
                .boot(kernel, run_dir, *accel, progress)
                .with_context(|| format!("{} under {accel}", kernel.release))?;
            match boot {
                Boot::Ran(result) => break result,
                Boot::KvmHung => {
                    progress.say(
                        "under KVM the kernel hung at boot (a nested /dev/kvm boots only \
                         special guests); using TCG from now on",
                    );
                    *accel = Accel::Tcg;
                }
            }
        };
        let elapsed = start.elapsed().as_secs_f64();
        match outcome {
            Ok(note) => Ok(format!(
                "{}: passed in {elapsed:.1} s under {accel}: {note}",
                kernel.release
            )),
            Err(error) => Err(anyhow!(
                "{}: FAILED after {elapsed:.1} s under {accel}: {error}",
                kernel.release
            )),
        }
    }

    fn boot(
        &self,
        kernel: &Kernel,
        run_dir: &Path,
        accel: Accel,
        progress: &Progress,
    ) -> anyhow::Result<Boot> {
        // The guest's own folder, emptied first: a result file of an earlier
        // run must never count for this one.
        let out = run_dir.join("out");
        remove_dir(run_dir)?;
        fs::create_dir_all(&out).with_context(|| format!("could not create {}", out.display()))?;
        let mut command = Command::new(&self.vng);
        // vng runs virtme-run and its other tools from PATH.
        let bin = self.vng.parent().unwrap_or(Path::new("."));
        let path = env::join_paths(
            std::iter::once(bin.to_owned())
                .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
        )
        .context("PATH cannot hold the virtme-ng virtualenv's bin folder")?;
        command
            .env("PATH", path)
            .arg("--run")
            .arg(&kernel.image)
            .args(["--cpus", GUEST_CPUS, "--memory", GUEST_MEMORY])
            // virtiofsd does not start here; 9p works everywhere.
            .arg("--force-9p")
            // The guest's output reaches the console only with the kernel's
            // (the stock kernels' virtio-serial is a module virtme-ng does
            // not load); [`Console`] shows the guest's lines live.
            .arg("--verbose")
            .arg(format!("--rwdir={}", out.display()))
            .arg("--cwd")
            .arg(crate::workspace_root())
            .arg("--exec")
            .arg(self.guest_command(&out)?)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that a timeout stops QEMU too.
            .process_group(0);
        if accel == Accel::Tcg {
            command.arg("--disable-kvm");
        }
        progress.say(format!(
            "booting {} under {accel} (console: {}) ...",
            kernel.release,
            run_dir.join("console.log").display()
        ));
        echo(&command);
        let mut child = command
            .spawn()
            .with_context(|| format!("could not start `{}`", show(&command)))?;
        let mut console = Console::start(&mut child, &run_dir.join("console.log"), kernel.label)?;
        let booted = out.join(crate::vm_guest::BOOTED);
        let start = Instant::now();
        loop {
            if child
                .try_wait()
                .context("could not check on vng")?
                .is_some()
            {
                break;
            }
            if accel == Accel::Kvm && !booted.exists() && console.hung(start) {
                stop_group(&mut child)?;
                return Ok(Boot::KvmHung);
            }
            if start.elapsed() > self.timeout {
                stop_group(&mut child)?;
                bail!(
                    "the guest did not finish within {} s; the console's end:\n{}",
                    self.timeout.as_secs(),
                    console.tail()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
        console.finish();
        // vng's exit status says nothing (without udev in the guest it is
        // 255 whatever happened): the guest's files do.
        let uname = fs::read_to_string(&booted).unwrap_or_default();
        if uname.trim() != kernel.release {
            bail!(
                "the guest did not report running {} (it wrote {:?}); the console's end:\n{}",
                kernel.release,
                uname.trim(),
                console.tail()
            );
        }
        let result = crate::vm_guest::read_result(&out).ok_or_else(|| {
            anyhow!(
                "the guest wrote no result in {}; the console's end:\n{}",
                out.display(),
                console.tail()
            )
        })?;
        Ok(Boot::Ran(result))
    }

    /// `xtask vm-guest ...` as one shell line for `vng --exec`.
    fn guest_command(&self, out: &Path) -> anyhow::Result<String> {
        let mut words = vec![
            self.xtask.clone(),
            PathBuf::from("vm-guest"),
            PathBuf::from("--out"),
            out.to_owned(),
            PathBuf::from("--ztxdp"),
            self.ztxdp.clone(),
        ];
        for test in &self.tests {
            words.push(PathBuf::from("--test"));
            words.push(test.clone());
        }
        words
            .iter()
            .map(|word| {
                word.to_str()
                    .map(sh_quote)
                    .ok_or_else(|| anyhow!("the path {} is not UTF-8", word.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map(|words| words.join(" "))
    }
}

/// POSIX shell quoting: the guest's shell need not be bash.
fn sh_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// SIGKILL to vng's process group (vng and its QEMU), then reaps vng.
fn stop_group(child: &mut Child) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(child.id()).context("vng's process id does not fit pid_t")?;
    // SAFETY: kill(2) on the process group of our own unreaped child, which
    // leads it (process_group(0)).
    if unsafe { libc::kill(-pid, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("could not stop vng's process group {pid}"));
    }
    child.wait().context("could not reap vng")?;
    Ok(())
}

/// The guest's console (vng's stdout and stderr): written to a file, its
/// lines other than the kernel's printed live with the kernel's label, and
/// its end kept for errors.
struct Console {
    tail: Arc<Mutex<Tail>>,
    readers: Vec<thread::JoinHandle<()>>,
}

/// The console's last lines, and when the last one came.
#[derive(Default)]
struct Tail {
    lines: Vec<String>,
    last: Option<Instant>,
}

impl Console {
    fn start(child: &mut Child, log: &Path, label: &str) -> anyhow::Result<Self> {
        let file =
            Arc::new(Mutex::new(File::create(log).with_context(|| {
                format!("could not create {}", log.display())
            })?));
        let tail = Arc::new(Mutex::new(Tail::default()));
        let streams: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(
                child
                    .stdout
                    .take()
                    .ok_or_else(|| anyhow!("vng's stdout was not captured"))?,
            ),
            Box::new(
                child
                    .stderr
                    .take()
                    .ok_or_else(|| anyhow!("vng's stderr was not captured"))?,
            ),
        ];
        let readers = streams
            .into_iter()
            .map(|stream| {
                let (file, tail, label) = (Arc::clone(&file), Arc::clone(&tail), label.to_owned());
                thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        if !is_kernel_log(&line) {
                            println!("  vm {label} | {line}");
                        }
                        if let Ok(mut file) = file.lock() {
                            // The console file is a convenience; the live
                            // output above has every line.
                            let _ = writeln!(file, "{line}");
                        }
                        if let Ok(mut tail) = tail.lock() {
                            if tail.lines.len() == CONSOLE_TAIL {
                                tail.lines.remove(0);
                            }
                            tail.lines.push(line);
                            tail.last = Some(Instant::now());
                        }
                    }
                })
            })
            .collect();
        Ok(Self { tail, readers })
    }

    /// Waits for the readers, which end with vng's output.
    fn finish(&mut self) {
        for reader in self.readers.drain(..) {
            // A reader that panicked lost only console lines.
            let _ = reader.join();
        }
    }

    fn tail(&self) -> String {
        self.tail
            .lock()
            .map(|tail| tail.lines.join("\n"))
            .unwrap_or_default()
    }

    /// Whether a guest under KVM, started at `start`, hangs at boot: the
    /// console fell silent after its first lines, or stayed silent.
    fn hung(&self, start: Instant) -> bool {
        let last = self.tail.lock().ok().and_then(|tail| tail.last);
        match last {
            Some(last) => last.elapsed() > KVM_SILENCE,
            None => start.elapsed() > KVM_BOOT_TIMEOUT,
        }
    }
}

/// `[   12.345678] ...`: a kernel message on the console.
fn is_kernel_log(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .is_some_and(|(stamp, _)| {
            let stamp = stamp.trim();
            !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_image_of_each_series_is_chosen() {
        let names = [
            "linux-image-6.1.0-9-amd64",
            "linux-image-6.1.0-57-amd64",
            "linux-image-6.1.0-57-amd64-unsigned",
            "linux-image-6.1.0-60-rt-amd64",
            "linux-image-6.1.0-60-cloud-amd64",
            "linux-image-6.1.0-56-amd64",
            "linux-image-6.12.118+deb12-amd64",
            "linux-image-6.12.9+deb12-amd64",
            "linux-image-6.12.120+deb12-cloud-amd64",
            "linux-image-6.12.119+deb12-amd64-unsigned",
            "linux-image-amd64",
        ];
        assert_eq!(
            newest(names.into_iter(), &SERIES[0]).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        assert_eq!(
            newest(names.into_iter(), &SERIES[1]).as_deref(),
            Some("linux-image-6.12.118+deb12-amd64")
        );
        assert_eq!(newest(["linux-image-amd64"].into_iter(), &SERIES[0]), None);
    }

    #[test]
    fn kernel_messages_are_told_from_the_guests_output() {
        assert!(is_kernel_log(
            "[    9.752049] virtme initramfs: loading netfs.ko.xz..."
        ));
        assert!(is_kernel_log("[12345.000001] reboot: Power down"));
        assert!(!is_kernel_log("xtask: [1/2] guest: ok"));
        assert!(!is_kernel_log("[ok] done"));
        assert!(!is_kernel_log("Probing EDD (edd=off to disable)... ok"));
    }

    #[test]
    fn guest_command_words_survive_a_posix_shell() {
        assert_eq!(
            sh_quote("/work/target/debug/xtask"),
            "/work/target/debug/xtask"
        );
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }
}
