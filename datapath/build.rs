//! Compiles the eBPF C programs under `bpf/` with clang into OUT_DIR.
//!
//! The programs only use UAPI structs (struct bpf_sock_addr, struct bpf_sock), so the
//! kernel's own headers plus libbpf's bpf_helpers.h are enough and no vmlinux.h has to
//! be generated: the build does not depend on the build machine's kernel.
//!
//! Without clang, a prebuilt object committed next to the source
//! (`bpf/prebuilt/<name>.o`, made by `bpf/build-prebuilt.sh`) is used, so the crate
//! still builds on machines that only run it; a warning says when it is older than the
//! source.

use std::{env, path::PathBuf, process::Command};

const PROGRAMS: &[&str] = &["sock_lb", "policy", "nodeport"];

// Second builds that differ only in their build id, so the tests can exercise an
// in-place program upgrade. Only built when clang is available.
const UPGRADE_VARIANTS: &[(&str, &str, &str)] =
    &[("sock_lb", "sock_lb_build2", "-DKS_BUILD_ID=2"), ("nodeport", "nodeport_build2", "-DKS_BUILD_ID=2")];

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let clang = env::var("KUBESHIFT_CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-env-changed=KUBESHIFT_CLANG");
    println!("cargo:rerun-if-changed=bpf");

    // asm/types.h lives under the multiarch include directory on Debian.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = format!("/usr/include/{arch}-linux-gnu");

    println!("cargo::rustc-check-cfg=cfg(ks_upgrade_variant)");
    let mut all_variants = true;
    for (src_name, out_name, define) in UPGRADE_VARIANTS {
        let variant = Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror", define])
            .arg(format!("-I{multiarch}"))
            .arg("-c")
            .arg(manifest.join("bpf").join(format!("{src_name}.c")))
            .arg("-o")
            .arg(out.join(format!("{out_name}.o")))
            .status();
        all_variants &= matches!(variant, Ok(s) if s.success());
    }
    if all_variants {
        println!("cargo:rustc-cfg=ks_upgrade_variant");
    }

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
                    panic!("cannot run {clang} ({e}) and no prebuilt object at {}", prebuilt.display());
                }
                println!("cargo:warning=clang not available ({e}); using {}", prebuilt.display());
                if is_stale(&src, &prebuilt.with_extension("c.cksum")) {
                    println!(
                        "cargo:warning={} was built from an older {}; run bpf/build-prebuilt.sh",
                        prebuilt.display(),
                        src.display()
                    );
                }
                std::fs::copy(&prebuilt, &obj).expect("copy prebuilt object");
            }
        }
    }
}

/// Compares the POSIX cksum of the source with the one recorded by build-prebuilt.sh.
/// Unknown (no cksum binary, no record) counts as not stale: this only feeds a warning.
fn is_stale(src: &std::path::Path, record: &std::path::Path) -> bool {
    let Ok(recorded) = std::fs::read_to_string(record) else {
        return false;
    };
    let Ok(file) = std::fs::File::open(src) else {
        return false;
    };
    let Ok(out) = Command::new("cksum").stdin(file).output() else {
        return false;
    };
    let current = String::from_utf8_lossy(&out.stdout);
    current.split_whitespace().next() != recorded.split_whitespace().next()
}
