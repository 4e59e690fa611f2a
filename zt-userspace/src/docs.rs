//! The shell completions and man pages of the command line, made from its
//! clap definitions by `ztxdp generate` (which `cargo xtask package` runs),
//! never written by hand: they cannot drift from `--help`.

use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// Why the files could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}", path.display())]
pub struct DocsError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The man section: system administration commands and daemons.
const MAN_SECTION: &str = "8";

/// Writes `OUT/completions/` (`ztxdp.bash`, `_ztxdp` for zsh,
/// `ztxdp.fish`) and `OUT/man/`: `ztxdp.8` and one page per subcommand,
/// `ztxdp-up.8`, `ztxdp-export-nft.8`...
/// Returns the files written.
///
/// # Errors
/// When a directory or file cannot be written.
pub fn generate(mut cmd: clap::Command, out: &Path) -> Result<Vec<PathBuf>, DocsError> {
    let name = cmd.get_name().to_owned();
    // `help` is no command of its own in a manual. Taken before the
    // completions are made, which builds `cmd` and so adds it.
    let mut pages = without_help(cmd.clone());
    let mut written = Vec::new();
    let completions = out.join("completions");
    create_dir(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path =
            clap_complete::generate_to(shell, &mut cmd, &name, &completions).map_err(|source| {
                DocsError {
                    path: completions.clone(),
                    source,
                }
            })?;
        written.push(path);
    }
    let man = out.join("man");
    create_dir(&man)?;
    // Names every subcommand `ztxdp-up`, `ztxdp-export-nft`... as its page.
    pages.build();
    man_pages(&pages, &man, &mut written)?;
    Ok(written)
}

fn man_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> Result<(), DocsError> {
    // A hidden subcommand (the confirmation watchdog) is no user's to run.
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, dir, written)?;
    }
    let page = clap_mangen::Man::new(cmd.clone()).section(MAN_SECTION);
    let path = dir.join(page.get_filename());
    page.generate_to(dir).map_err(|source| DocsError {
        path: path.clone(),
        source,
    })?;
    written.push(path);
    Ok(())
}

/// `cmd` and its subcommands without the `help` subcommand clap adds.
fn without_help(cmd: clap::Command) -> clap::Command {
    cmd.disable_help_subcommand(true)
        .mut_subcommands(without_help)
}

fn create_dir(path: &Path) -> Result<(), DocsError> {
    std::fs::create_dir_all(path).map_err(|source| DocsError {
        path: path.to_owned(),
        source,
    })
}
