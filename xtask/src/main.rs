//! Developer tasks: `cargo xtask test | build | run | bench | vmtest`. See
//! `cargo xtask --help`.
//!
//! Every task first installs what is missing (Debian packages, nightly's
//! rust-src, bpf-linker), saying what it does, then builds.
mod audit_view;
mod bench;
mod cmd;
mod lab_run;
mod package;
mod setup;
mod vm_guest;
mod vmtest;

use std::{
    env,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use crate::cmd::{Progress, echo, ensure_root, show};

#[derive(Parser)]
#[command(about = "ztxdp developer tasks", disable_help_subcommand = true)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing, build, run every test (needs root). What CI runs.
    Test,
    /// Install what is missing and build.
    Build,
    /// Install what is missing (cargo-deb too), build a release `ztxdp`
    /// and its Debian package, target/debian/ztxdp_<version>_<arch>.deb.
    Package,
    /// Without arguments: run ztxdp in a throw-away lab of network namespaces,
    /// send traffic of every kind and print its decisions live (needs root).
    /// With `-- --config FILE [ARGS...]`: run `ztxdp up --config FILE ARGS...`
    /// for real, on this machine's interfaces.
    Run {
        /// Stop the lab after this many seconds (default: at Ctrl-C).
        #[arg(long, value_name = "SECS")]
        duration: Option<u64>,
        /// Arguments for a real `ztxdp up` (after `--`).
        #[arg(last = true, value_name = "UP_ARGS")]
        up_args: Vec<String>,
    },
    /// Packets per second of ztxdp against nftables, xdp-filter and a bare
    /// `XDP_DROP` in network namespaces, plus `test_run` costs, scaling
    /// curves and control-plane figures; writes bench/results/ (needs root).
    Bench(bench::BenchArgs),
    /// Boot Debian's 6.1 and 6.12 kernels under QEMU (virtme-ng, this
    /// machine's root shared read-only) and run a tier-3 smoke in each
    /// (needs root). Installs QEMU and virtme-ng, downloads the kernels
    /// into target/vmtest/.
    Vmtest {
        /// Run the tier-2 tests in each VM too (about 6 minutes a kernel
        /// without KVM).
        #[arg(long)]
        full: bool,
    },
    /// Inside a `vmtest` guest: run the smoke and the given test binaries,
    /// writing the outcome into OUT.
    #[command(hide = true)]
    VmGuest {
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
        #[arg(long, value_name = "ZTXDP")]
        ztxdp: PathBuf,
        #[arg(long = "test", value_name = "BINARY")]
        tests: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Task::VmGuest { out, ztxdp, tests } = &cli.task {
        // No steps: the host reports, from the files this writes.
        return match vm_guest::run(out, ztxdp, tests) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("xtask: error: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let mut steps = Steps::new(match &cli.task {
        Task::Build => 4,
        Task::Run { .. } | Task::Bench(_) => 5,
        Task::Package => 7,
        Task::Test => 9 + vmtest::step_count(vmtest::Suite::Smoke),
        Task::Vmtest { full } => 4 + vmtest::step_count(suite(*full)),
        Task::VmGuest { .. } => 0,
    });
    let result = match cli.task {
        Task::Build => install_and_build(&mut steps),
        Task::Package => build_package(&mut steps).map(drop),
        Task::Test => test(&mut steps),
        Task::Run { duration, up_args } => {
            run(&mut steps, duration.map(Duration::from_secs), &up_args)
        }
        Task::Bench(args) => bench::run(&mut steps, &args),
        Task::Vmtest { full } => vm(&mut steps, suite(full)),
        Task::VmGuest { .. } => Ok(()),
    };
    if let Err(error) = &result {
        // Not `{error:?}`: with RUST_BACKTRACE set that adds a backtrace of xtask itself.
        eprintln!("xtask: error: {error}");
        for cause in error.chain().skip(1) {
            eprintln!("xtask:   caused by: {cause}");
        }
    }
    steps.summary(result.is_ok());
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn test(steps: &mut Steps) -> anyhow::Result<()> {
    ensure_root("the tests create network namespaces and load BPF programs")?;
    // The package test installs it into a scratch root and checks its unit
    // with `systemd-analyze verify`.
    let deb = build_package(steps)?;
    let mut counts = TestCounts::default();
    let result = steps.run("tests", |progress| {
        for name in zt_tests::netns::NetNs::remove_stale()
            .context("could not clean up namespaces of earlier runs")?
        {
            progress.say(format!("removed namespace {name} left by a killed run"));
        }
        cargo_test(&ztxdp_bin()?, &deb, &mut counts)?;
        counts.note()
    });
    steps.tests = counts;
    result?;
    // The benchmark harness, seconds long: every mode must produce figures
    // and pass its drop/pass check. It asserts no speed.
    steps.run("bench smoke", |_| {
        cmd::run(cargo().args([
            "run",
            "--release",
            "-q",
            "-p",
            "xtask",
            "--features",
            "bench",
            "--",
            "bench",
            "--smoke",
        ]))?;
        Ok("every mode measured and checked".to_owned())
    })?;
    // The programs on the kernels users run, not only on this one.
    vmtest::steps(steps, vmtest::Suite::Smoke, &ztxdp_bin()?)
}

fn suite(full: bool) -> vmtest::Suite {
    if full {
        vmtest::Suite::Full
    } else {
        vmtest::Suite::Smoke
    }
}

fn vm(steps: &mut Steps, suite: vmtest::Suite) -> anyhow::Result<()> {
    ensure_root("the guests share this machine's root and run as root")?;
    install_and_build(steps)?;
    vmtest::steps(steps, suite, &ztxdp_bin()?)
}

fn run(steps: &mut Steps, duration: Option<Duration>, up_args: &[String]) -> anyhow::Result<()> {
    if up_args.is_empty() {
        ensure_root("the lab creates network namespaces and loads BPF programs")?;
    } else if duration.is_some() {
        bail!("--duration applies to the lab only; stop a real `ztxdp up` with Ctrl-C");
    }
    install_and_build(steps)?;
    let ztxdp = ztxdp_bin()?;
    if !up_args.is_empty() {
        return Err(lab_run::exec_up(&ztxdp, up_args));
    }
    let run_dir = target_dir()
        .join("xtask")
        .join(format!("run-{}", std::process::id()));
    steps.run("lab", |progress| {
        lab_run::lab(&ztxdp, &run_dir, duration, progress)
    })
}

/// [`install_and_build`], then the release binary and its package.
fn build_package(steps: &mut Steps) -> anyhow::Result<PathBuf> {
    install_and_build(steps)?;
    steps.run("cargo-deb", package::cargo_deb)?;
    steps.run("release build", package::build_release)?;
    let mut deb = PathBuf::new();
    steps.run("package", |progress| {
        deb = package::deb(progress)?;
        Ok(deb.display().to_string())
    })?;
    Ok(deb)
}

fn install_and_build(steps: &mut Steps) -> anyhow::Result<()> {
    steps.run("apt packages", setup::apt_packages)?;
    steps.run("rust-src", setup::rust_src)?;
    steps.run("bpf-linker", setup::bpf_linker)?;
    steps.run("build", |_| {
        // `--workspace` would include zt-ebpf, which only builds for the BPF
        // target; zt-userspace's build script builds it from there.
        cmd::run(cargo().args(["build", "--workspace", "--exclude", "zt-ebpf"]))?;
        Ok(format!("ztxdp is {}", ztxdp_bin()?.display()))
    })
}

/// Runs a test command with its output passed through, adding its
/// `test result:` lines to `counts`.
fn run_counted(command: &mut Command, counts: &mut TestCounts) -> anyhow::Result<ExitStatus> {
    command.stdout(Stdio::piped());
    echo(command);
    let mut child = command
        .spawn()
        .with_context(|| format!("could not start `{}`", show(command)))?;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line =
                line.with_context(|| format!("could not read the output of `{}`", show(command)))?;
            println!("{line}");
            counts.add(&line);
        }
    }
    child
        .wait()
        .with_context(|| format!("could not wait for `{}`", show(command)))
}

#[derive(Default)]
struct TestCounts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Seconds each fuzz property (`zt-userspace/tests/fuzz_*.rs`: the audit
/// verifier and the config parser) runs for. A target's properties share
/// the test threads (two on CI), so the verifier's three take about twice
/// this and the config parser's two about this. A plain `cargo test`
/// gives each 3 s.
const FUZZ_SECONDS: u32 = 20;

/// `cargo test`, its output passed through, the `test result:` lines summed.
fn cargo_test(ztxdp: &Path, deb: &Path, counts: &mut TestCounts) -> anyhow::Result<()> {
    let mut command = cargo();
    command
        .env("ZTXDP_BIN", ztxdp)
        .env("ZTXDP_DEB", deb)
        .env("ZTXDP_FUZZ_SECONDS", FUZZ_SECONDS.to_string())
        .args([
            "test",
            "--workspace",
            "--exclude",
            "zt-ebpf",
            // The benchmark harness's unit tests live behind this feature.
            "--features",
            "xtask/bench",
            "--no-fail-fast",
        ]);
    let status = run_counted(&mut command, counts)?;
    if !status.success() {
        if counts.total() == 0 {
            bail!(
                "`cargo test` exited with {status} before any test ran (a compile error?); see its output above"
            );
        }
        bail!(
            "{} passed, {} failed: `cargo test` exited with {status}; search the output above for `FAILED` and `panicked`",
            counts.passed,
            counts.failed
        );
    }
    Ok(())
}

impl TestCounts {
    fn total(&self) -> u64 {
        self.passed + self.failed + self.ignored
    }

    fn note(&self) -> anyhow::Result<String> {
        if self.passed == 0 {
            bail!("cargo test ran no test");
        }
        Ok(self.to_string())
    }

    /// `test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; ...`
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        let Some((_, fields)) = rest.split_once(". ") else {
            return;
        };
        for field in fields.split("; ") {
            let Some((number, what)) = field.split_once(' ') else {
                continue;
            };
            let Ok(number) = number.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += number,
                "failed" => self.failed += number,
                "ignored" => self.ignored += number,
                _ => {}
            }
        }
    }
}

impl std::fmt::Display for TestCounts {
    /// The plain closing line CI reads: `N passed, N failed, N skipped`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        )
    }
}

/// The steps of one task, numbered as they run and summarised at the end.
struct Steps {
    total: usize,
    done: Vec<(String, Duration, Result<String, String>)>,
    /// What `cargo test` reported, printed as the very last line.
    tests: TestCounts,
}

impl Steps {
    fn new(total: usize) -> Self {
        Self {
            total,
            done: Vec::new(),
            tests: TestCounts::default(),
        }
    }

    fn run(
        &mut self,
        name: &str,
        step: impl FnOnce(&Progress) -> anyhow::Result<String>,
    ) -> anyhow::Result<()> {
        let tag = format!("[{}/{}] {name}", self.done.len() + 1, self.total);
        let progress = Progress::new(tag.clone());
        let start = Instant::now();
        let result = step(&progress);
        let elapsed = start.elapsed();
        match result {
            Ok(note) => {
                progress.say(&note);
                self.done.push((tag, elapsed, Ok(note)));
                Ok(())
            }
            Err(error) => {
                progress.say(format!("FAILED: {error:#}"));
                self.done.push((tag, elapsed, Err(format!("{error:#}"))));
                Err(error)
            }
        }
    }

    fn summary(&self, succeeded: bool) {
        // Nothing to list when the task failed before its first step.
        if !self.done.is_empty() {
            println!("xtask: summary:");
            for (tag, elapsed, result) in &self.done {
                let (mark, note) = match result {
                    Ok(note) => ("ok    ", note),
                    Err(error) => ("FAILED", error),
                };
                // The first line only: the full error is printed above.
                let note = note.lines().next().unwrap_or_default();
                println!(
                    "xtask:   {mark} {tag} ({:.1} s): {note}",
                    elapsed.as_secs_f64()
                );
            }
            for step in self.done.len() + 1..=self.total {
                println!("xtask:   skipped [{step}/{}]", self.total);
            }
        }
        println!(
            "xtask: {}",
            if succeeded {
                "all steps succeeded"
            } else {
                "FAILED"
            }
        );
        if self.tests.total() > 0 {
            println!("xtask: {}", self.tests);
        }
    }
}

fn cargo() -> Command {
    let mut command = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn workspace_root() -> PathBuf {
    // xtask/ sits at the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

fn ztxdp_bin() -> anyhow::Result<PathBuf> {
    let path = target_dir().join("debug").join("ztxdp");
    if !path.is_file() {
        bail!(
            "{} is missing: `cargo build` did not produce it",
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_result_lines_are_summed() {
        let mut counts = TestCounts::default();
        counts.add("test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.17s");
        counts.add("test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s");
        counts.add("test something ... ok");
        assert_eq!((counts.passed, counts.failed, counts.ignored), (7, 3, 1));
    }
}
