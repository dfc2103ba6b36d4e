//! A network namespace owned by one test: created with a unique name and
//! deleted on drop, so a failed assertion leaves nothing behind.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Netns {
    pub name: String,
    pub tmp: PathBuf,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        // pid + a per-process counter: tests of one binary run in parallel
        // and may pass the same tag.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("ksplan-{}-{n}-{tag}", std::process::id());
        let tmp = std::env::temp_dir().join(&name);
        // The guard is made only once the namespace exists: if `ip netns add`
        // fails (say the name is taken), dropping it must not delete a
        // namespace this test does not own.
        sh("ip", &["netns", "add", &name]);
        let ns = Netns { name, tmp };
        std::fs::create_dir_all(&ns.tmp).unwrap();
        ns
    }

    pub fn exec(&self, args: &[&str]) {
        let mut a = vec!["netns", "exec", &self.name];
        a.extend_from_slice(args);
        sh("ip", &a);
    }

    /// Runs a command inside with `input` on stdin; returns stdout.
    pub fn exec_stdin(&self, args: &[&str], input: &str) -> String {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "`{}` in {} failed: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

pub fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "`{cmd} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}
