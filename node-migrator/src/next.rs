//! What a node's migration does next, decided purely from its NodeMigration, and the
//! status transitions that journal each step. No I/O: the driver reads the object,
//! calls [`next`], performs at most one step, and writes the status [`entered`] /
//! [`finished`] return, so a run killed anywhere resumes from the object alone.
//!
//! The journal's rule: a step is written as entered before it changes anything and as
//! finished only once its postcondition holds. A step found entered but not finished
//! is run again (every step tolerates "already done").

use crate::crd::{Direction, InProgress, NodeMigrationSpec, NodeMigrationStatus, StepRecord};
use kubeshift_planner::plan::StepAction;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Run `step` in `direction` (for `Rollback`, the step's inverse).
    Act { step: StepAction, direction: Direction },
    /// The node is where apply wants it.
    Done,
    /// It cannot go on without a human: the reason, as recorded.
    Stuck(String),
}

/// Index of `step` in the node's steps; `None` (nothing reached) sorts before all.
fn position(spec: &NodeMigrationSpec, step: Option<StepAction>) -> Result<Option<usize>, String> {
    match step {
        None => Ok(None),
        Some(s) => spec
            .steps
            .iter()
            .position(|x| *x == s)
            .map(Some)
            .ok_or_else(|| format!("{} is not one of node {}'s steps {:?}", name(s), spec.node, spec.steps)),
    }
}

/// The step's name as the plan, the status and the logs spell it.
pub fn name(step: StepAction) -> String {
    serde_json::to_value(step).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

pub fn next(spec: &NodeMigrationSpec, status: &NodeMigrationStatus) -> Next {
    if let Some(why) = &status.blocked {
        return Next::Stuck(why.clone());
    }
    if let Some(p) = &status.in_progress {
        return Next::Act { step: p.step, direction: p.direction };
    }
    let (reached, wanted) = match (position(spec, status.reached), position(spec, spec.wanted)) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => return Next::Stuck(e),
    };
    match spec.direction {
        Direction::Forward if reached < wanted => {
            let i = reached.map_or(0, |r| r + 1);
            Next::Act { step: spec.steps[i], direction: Direction::Forward }
        }
        Direction::Rollback if reached > wanted => {
            Next::Act { step: spec.steps[reached.expect("above wanted")], direction: Direction::Rollback }
        }
        _ => Next::Done,
    }
}

/// The status once `step` has been entered (written before it changes anything).
pub fn entered(
    mut status: NodeMigrationStatus,
    step: StepAction,
    direction: Direction,
    now: &str,
) -> NodeMigrationStatus {
    status.in_progress = Some(InProgress { step, direction, started_at: now.to_string() });
    status.phase = match direction {
        Direction::Forward => name(step),
        Direction::Rollback => format!("rollback-{}", name(step)),
    };
    status.ready = false;
    status
}

/// The status once `step`'s postcondition holds: the journal entry with what it changed,
/// and `reached` moved (forward: to the step; rollback: to the step before it).
pub fn finished(
    spec: &NodeMigrationSpec,
    mut status: NodeMigrationStatus,
    changed: serde_json::Value,
    summary: &str,
    now: &str,
) -> NodeMigrationStatus {
    let Some(p) = status.in_progress.take() else { return status };
    status.history.push(StepRecord {
        step: p.step,
        direction: p.direction,
        started_at: p.started_at,
        finished_at: now.to_string(),
        changed,
        summary: summary.to_string(),
    });
    status.reached = match p.direction {
        Direction::Forward => Some(p.step),
        Direction::Rollback => {
            let i = spec.steps.iter().position(|s| *s == p.step).unwrap_or(0);
            i.checked_sub(1).map(|j| spec.steps[j])
        }
    };
    let done = next(spec, &status) == Next::Done;
    status.phase = match (done, status.reached, spec.direction) {
        (true, Some(r), Direction::Forward) if spec.steps.last() == Some(&r) => "Done".into(),
        (true, None, Direction::Rollback) => "RolledBack".into(),
        (_, Some(r), _) => name(r),
        (_, None, _) => "Pending".into(),
    };
    status.ready = status.phase == "Done";
    status
}

/// What a step's inverse needs from its forward run: the `changed` of the newest
/// forward record of that step (`Null` when it never ran, which the inverse takes as
/// "nothing to undo").
pub fn forward_record(status: &NodeMigrationStatus, step: StepAction) -> serde_json::Value {
    status
        .history
        .iter()
        .rev()
        .find(|r| r.step == step && r.direction == Direction::Forward)
        .map(|r| r.changed.clone())
        .unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use StepAction::*;

    fn spec(wanted: Option<StepAction>, direction: Direction) -> NodeMigrationSpec {
        NodeMigrationSpec {
            node: "node-1".into(),
            steps: vec![Cordon, Drain, SwitchPods, TakeOverServices, CleanKubeProxy, Uncordon, ConnectivityGate],
            wanted,
            direction,
            ..Default::default()
        }
    }

    fn at(reached: Option<StepAction>) -> NodeMigrationStatus {
        NodeMigrationStatus { reached, ..Default::default() }
    }

    #[test]
    fn next_step_table() {
        let fwd = |s| Next::Act { step: s, direction: Direction::Forward };
        let back = |s| Next::Act { step: s, direction: Direction::Rollback };
        let cases = [
            (spec(Some(ConnectivityGate), Direction::Forward), at(None), fwd(Cordon)),
            (spec(Some(ConnectivityGate), Direction::Forward), at(Some(Drain)), fwd(SwitchPods)),
            (spec(Some(ConnectivityGate), Direction::Forward), at(Some(ConnectivityGate)), Next::Done),
            // A partial run (`--until-wave`, a stop after drain): done where it was asked to stop.
            (spec(Some(Drain), Direction::Forward), at(Some(Drain)), Next::Done),
            (spec(None, Direction::Forward), at(None), Next::Done),
            // Rollback undoes from the newest reached step down to the wanted one.
            (spec(None, Direction::Rollback), at(Some(CleanKubeProxy)), back(CleanKubeProxy)),
            (spec(None, Direction::Rollback), at(Some(Cordon)), back(Cordon)),
            (spec(None, Direction::Rollback), at(None), Next::Done),
            (spec(Some(Drain), Direction::Rollback), at(Some(SwitchPods)), back(SwitchPods)),
            (spec(Some(Drain), Direction::Rollback), at(Some(Drain)), Next::Done),
        ];
        for (i, (s, st, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                next(&s, &st),
                want,
                "case {i}: wanted {:?} {:?}, reached {:?}",
                s.wanted,
                s.direction,
                st.reached
            );
        }
    }

    #[test]
    fn a_step_entered_but_not_finished_is_run_again() {
        let s = spec(Some(ConnectivityGate), Direction::Forward);
        let st = entered(at(Some(Cordon)), Drain, Direction::Forward, "t0");
        assert_eq!(st.phase, "drain");
        assert_eq!(next(&s, &st), Next::Act { step: Drain, direction: Direction::Forward });
        // Even after apply changed its mind and asks for a rollback: the interrupted step
        // finishes first, so its record exists for the inverse.
        let back = spec(None, Direction::Rollback);
        assert_eq!(next(&back, &st), Next::Act { step: Drain, direction: Direction::Forward });
    }

    #[test]
    fn the_journal_walks_forward_and_back() {
        let s = spec(Some(ConnectivityGate), Direction::Forward);
        let mut st = NodeMigrationStatus::default();
        while let Next::Act { step, direction } = next(&s, &st) {
            st = entered(st, step, direction, "t");
            st = finished(&s, st, json!({"step": name(step)}), "ok", "t");
        }
        assert_eq!(st.phase, "Done");
        assert!(st.ready);
        assert_eq!(st.history.len(), 7);
        assert_eq!(forward_record(&st, Drain), json!({"step": "drain"}));
        assert_eq!(forward_record(&st, InstallDatapath), serde_json::Value::Null, "never ran: nothing to undo");

        let back = spec(None, Direction::Rollback);
        let mut undone = vec![];
        while let Next::Act { step, direction } = next(&back, &st) {
            assert_eq!(direction, Direction::Rollback);
            undone.push(step);
            st = entered(st, step, direction, "t");
            assert!(st.phase.starts_with("rollback-"));
            st = finished(&back, st, json!({}), "undone", "t");
        }
        assert_eq!(undone, [ConnectivityGate, Uncordon, CleanKubeProxy, TakeOverServices, SwitchPods, Drain, Cordon]);
        assert_eq!(st.phase, "RolledBack");
        assert_eq!(st.reached, None);
        assert!(!st.ready);
    }

    #[test]
    fn a_blocked_node_or_an_unknown_step_is_stuck() {
        let s = spec(Some(ConnectivityGate), Direction::Forward);
        let blocked = NodeMigrationStatus { blocked: Some("PDB web refuses".into()), ..Default::default() };
        assert_eq!(next(&s, &blocked), Next::Stuck("PDB web refuses".into()));
        let foreign = at(Some(InstallDatapath));
        assert!(matches!(next(&s, &foreign), Next::Stuck(m) if m.contains("install-datapath")));
    }
}
