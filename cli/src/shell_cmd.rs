//! `kubeshift completion SHELL` and `kubeshift man`: generated from the same clap
//! definition that parses the command line, so they cannot drift from it.

use anyhow::{bail, Context, Result};
use clap::Args;
use clap_complete::Shell;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct CompletionArgs {
    /// bash: `source <(kubeshift completion bash)`; zsh: into a directory on $fpath as
    /// `_kubeshift`; fish: `kubeshift completion fish > ~/.config/fish/completions/kubeshift.fish`.
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Args)]
pub struct ManArgs {
    /// Write kubeshift.1 and one page per subcommand (kubeshift-migrate-plan.1, ...) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn completion(a: &CompletionArgs) -> Result<()> {
    let mut out = std::io::stdout().lock();
    write_completion(a.shell, &mut out)?;
    out.flush()?;
    Ok(())
}

pub fn write_completion(shell: Shell, w: &mut dyn Write) -> Result<()> {
    // Always for `kubeshift`: shells complete the command name they were given, and the
    // kubectl plugin name is completed by kubectl's own plugin completion.
    let mut cmd = crate::cli_command(None);
    clap_complete::generate(shell, &mut cmd, "kubeshift", w);
    Ok(())
}

pub fn man(a: &ManArgs) -> Result<()> {
    let cmd = crate::cli_command(None);
    match &a.out {
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            out.flush()?;
        }
        Some(dir) => {
            let pages = write_man_pages(cmd, dir)?;
            eprintln!("{} man pages written to {}", pages.len(), dir.display());
        }
    }
    Ok(())
}

/// Writes one page per (visible) command, named `kubeshift-migrate-plan.1` and so on,
/// as man(1) finds them (`man kubeshift-migrate-plan`). Returns the files written.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.exists() && !dir.is_dir() {
        bail!("--out {}: not a directory", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir).with_context(|| format!("writing man pages to {}", dir.display()))?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "1"))
        .collect();
    pages.sort();
    Ok(pages)
}
