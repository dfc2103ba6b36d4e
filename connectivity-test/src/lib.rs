//! The built-in connectivity suite (`kubeshift connectivity test`): the gate between
//! migration steps. Probe agents in test pods run the probes themselves and report
//! through the API; the suite judges scenarios and keeps a verdict matrix that can be
//! saved before a migration and compared after it.
//!
//! What it may touch: one namespace it creates (default `kubeshift-connectivity`),
//! removed at the end unless `--keep`.

pub mod agent;
pub mod deploy;
pub mod disrupt;
pub mod model;
pub mod policy;
pub mod report;
pub mod scenarios;
pub mod suite;
