//! Compiles the eBPF C programs under `bpf/` with clang into OUT_DIR.
//!
//! The programs only use UAPI structs (struct bpf_sock_addr, struct bpf_sock), so the
//! kernel's own headers plus libbpf's bpf_helpers.h are enough and no vmlinux.h has to
//! be generated: the build does not depend on the build machine's kernel.
//!
//! Without clang, a prebuilt object committed next to the source
//! (`bpf/prebuilt/<name>.o`) is used, so the crate still builds on machines that only
//! run it.

use std::{env, path::PathBuf, process::Command};

const PROGRAMS: &[&str] = &["sock_lb"];

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let clang = env::var("KUBESHIFT_CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-env-changed=KUBESHIFT_CLANG");
    println!("cargo:rerun-if-changed=bpf");

    // asm/types.h lives under the multiarch include directory on Debian.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = format!("/usr/include/{arch}-linux-gnu");

    for name in PROGRAMS {
        let src = manifest.join("bpf").join(format!("{name}.c"));
        let obj = out.join(format!("{name}.o"));
        let status = Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .arg(format!("-I{multiarch}"))
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("clang failed on {}: {s}", src.display()),
            Err(e) => {
                let prebuilt = manifest.join("bpf/prebuilt").join(format!("{name}.o"));
                if !prebuilt.exists() {
                    panic!(
                        "cannot run {clang} ({e}) and no prebuilt object at {}",
                        prebuilt.display()
                    );
                }
                println!(
                    "cargo:warning=clang not available ({e}); using {}",
                    prebuilt.display()
                );
                std::fs::copy(&prebuilt, &obj).expect("copy prebuilt object");
            }
        }
    }
}
