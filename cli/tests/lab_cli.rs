//! The lab's command line on bad input and after a crash: clear errors, non-zero
//! exits, nothing left behind.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn unknown_cni_is_refused_and_nothing_is_created() {
    let out = kubeshift().args(["lab", "up", "--name", "tbadcni", "--cni", "weave"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown CNI \"weave\""), "{err}");
    assert!(kubeshift_lab::down::leftovers("tbadcni").is_empty());
}

/// A node whose CNI bin dir got the `kubeshift` binary itself (the lab's image when
/// only `-p kubeshift` was built) still has a working plugin: run with no arguments and
/// CNI_COMMAND set, kubeshift answers as the CNI plugin, not with its usage.
#[test]
fn kubeshift_without_arguments_under_cni_command_is_the_cni_plugin() {
    use std::io::Write;
    let mut child = kubeshift()
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(br#"{"cniVersion":"1.0.0"}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["supportedVersions"].as_array().is_some_and(|a| a.iter().any(|x| x == "1.1.0")), "{v}");
}

#[test]
fn status_of_a_lab_that_is_not_up_says_so() {
    let out = kubeshift().args(["lab", "status", "--name", "tnothere"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lab tnothere is not up"));
}

#[test]
fn down_cleans_up_after_lab_up_is_killed_midway() {
    let name = "tcrash";
    let _guard = Lab::named(name);
    let mut child = kubeshift().args(["lab", "up", "--name", name, "--nodes", "2", "--no-demo"]).spawn().unwrap();
    // Kill `lab up` once it has started processes and made namespaces.
    let state = kubeshift_lab::spec::state_dir(name);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let started = kubeshift_lab::LabState::load(&state).ok().flatten().map(|s| s.processes.len()).unwrap_or(0);
        if started >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "lab up never started its processes");
        assert!(child.try_wait().unwrap().is_none(), "lab up ended before it could be killed");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!kubeshift_lab::down::leftovers(name).is_empty(), "the crash should have left something to clean");

    run_ok(kubeshift().args(["lab", "down", "--name", name]));
    let left = kubeshift_lab::down::leftovers(name);
    assert!(left.is_empty(), "left after down: {left:?}");
    // Twice is fine.
    run_ok(kubeshift().args(["lab", "down", "--name", name]));
}
