//! What a running lab is, as written to `<state dir>/state.json` by `lab up` and read
//! by `lab status` and `lab down`. `lab down` does not depend on it being present or
//! complete: it also finds leftovers by name prefix.

use crate::spec::LabSpec;
use crate::sys::ProcessRecord;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub spec: LabSpec,
    /// Loopback port of the apiserver forwarder on the host.
    pub api_port: u16,
    pub kubeconfig: PathBuf,
    pub cgroup: PathBuf,
    pub processes: Vec<ProcessRecord>,
}

impl LabState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    pub fn load(dir: &Path) -> Result<Option<LabState>> {
        let p = Self::path(dir);
        match std::fs::read_to_string(&p) {
            Ok(s) => {
                Ok(Some(serde_json::from_str(&s).with_context(|| format!("{}: not a lab state file", p.display()))?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Written after every process start, so a crash of `lab up` still leaves the
    /// PIDs for `lab down`.
    pub fn save(&self) -> Result<()> {
        let dir = self.spec.state_dir();
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, Self::path(&dir))?;
        Ok(())
    }

    pub fn add_process(&mut self, p: ProcessRecord) -> Result<()> {
        self.processes.push(p);
        self.save()
    }
}
