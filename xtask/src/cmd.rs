//! Running external commands: every one is echoed first, so a log of
//! `cargo xtask` shows exactly what to repeat by hand.
use std::{
    ffi::OsStr,
    fmt::Display,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Prints progress lines for one step, `xtask: [2/5] rust-src: ...`.
pub struct Progress {
    tag: String,
}

impl Progress {
    pub fn new(tag: String) -> Self {
        Self { tag }
    }

    pub fn say(&self, message: impl Display) {
        println!("xtask: {}: {message}", self.tag);
    }
}

/// The command as a shell line, environment overrides first.
pub fn show(command: &Command) -> String {
    let envs = command.get_envs().filter_map(|(key, value)| {
        value.map(|value| {
            format!(
                "{}={}",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            )
        })
    });
    let argv = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .map(|word| quote(&word));
    envs.chain(argv).collect::<Vec<_>>().join(" ")
}

/// Shell quoting for display: `$'...'` (bash ANSI-C quoting) when needed.
fn quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        return word.to_owned();
    }
    let escaped = word
        .replace('\\', "\\\\")
        .replace('\'', "\\'")
        .replace('\n', "\\n");
    format!("$'{escaped}'")
}

pub fn echo(command: &Command) {
    println!("xtask: $ {}", show(command));
}

/// Runs with the terminal as stdout/stderr.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    echo(command);
    let status = command.status().with_context(|| {
        format!(
            "could not start `{}`: is it installed and in PATH?",
            show(command)
        )
    })?;
    if !status.success() {
        bail!("`{}` failed ({status}); its output is above", show(command));
    }
    Ok(())
}

/// Runs and returns stdout; the error carries stderr.
pub fn output(command: &mut Command) -> anyhow::Result<String> {
    echo(command);
    let output = command.stdin(Stdio::null()).output().with_context(|| {
        format!(
            "could not start `{}`: is it installed and in PATH?",
            show(command)
        )
    })?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            show(command),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Like [`output`], but a command that is missing or fails is an answer
/// (`None`), not an error: for detecting what is installed.
pub fn probe(command: &mut Command) -> Option<String> {
    echo(command);
    let output = command.stdin(Stdio::null()).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with a message naming `why` root is needed.
pub fn ensure_root(why: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            r#"{why}, which needs root: run it again as root, e.g. `sudo -E env "PATH=$PATH" cargo xtask ...`"#
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_commands_can_be_pasted_into_bash() {
        let mut command = Command::new("dpkg-query");
        command
            .env("LLVM_PREFIX", "/a b")
            .args(["-W", "-f=${Package} ${Status}\n", "it's", ""]);
        assert_eq!(
            show(&command),
            r"LLVM_PREFIX=$'/a b' dpkg-query -W $'-f=${Package} ${Status}\n' $'it\'s' $''"
        );
    }
}
