//! `kubeshift migrate apply`, `rollback` and `status`: the cluster-facing half of the
//! node-migrator (DESIGN.md, "Migration").

use crate::migrate_cmd::{ApplyArgs, RollbackArgs, StatusArgs};
use anyhow::{bail, Result};

pub async fn apply(a: ApplyArgs) -> Result<()> {
    let _ = a;
    bail!("`migrate apply` is not built yet (issue: the node-migrator); nothing was changed")
}

pub async fn rollback(a: RollbackArgs) -> Result<()> {
    let _ = a;
    bail!("`migrate rollback` is not built yet (issue: the node-migrator); nothing was changed")
}

pub async fn status(a: StatusArgs) -> Result<()> {
    let _ = a;
    bail!("`migrate status` is not built yet (issue: the node-migrator)")
}
