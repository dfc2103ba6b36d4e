//! The per-node migration state machine (DESIGN.md, "Phases of one node").
//! Not built yet: see the open node-migrator issue.

pub mod cleanup;
