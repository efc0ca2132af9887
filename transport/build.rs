//! Compiles the libfabric shim (`csrc/ofi_shim.c`) when the libfabric headers are found,
//! and then sets `cfg(dragon_ofi)`. Without the headers the crate builds without the
//! shim and `open("ofi")` reports that the back end is unavailable. libfabric itself is
//! never linked: the shim loads it at run time (dlopen), so the result runs on machines
//! without it.
//!
//! Header search: `$DRAGON_OFI_INCLUDE` (a directory holding `rdma/fabric.h`), then
//! `pkg-config --variable=includedir libfabric`, then `/usr/include`, `/usr/local/include`,
//! `/opt/libfabric/include`. `DRAGON_OFI=0` builds without the shim even when the headers
//! are there.

use std::path::PathBuf;
use std::process::Command;

fn include_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(d) = std::env::var("DRAGON_OFI_INCLUDE") {
        dirs.push(d.into());
    }
    if let Ok(o) = Command::new("pkg-config")
        .args(["--variable=includedir", "libfabric"])
        .output()
    {
        if o.status.success() {
            let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if !s.is_empty() {
                dirs.push(s.into());
            }
        }
    }
    for d in [
        "/usr/include",
        "/usr/local/include",
        "/opt/libfabric/include",
    ] {
        dirs.push(d.into());
    }
    dirs.into_iter()
        .find(|d| d.join("rdma/fabric.h").is_file() && d.join("rdma/fi_rma.h").is_file())
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dragon_ofi)");
    println!("cargo::rerun-if-changed=csrc/ofi_shim.c");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=DRAGON_OFI");
    println!("cargo::rerun-if-env-changed=DRAGON_OFI_INCLUDE");
    if std::env::var("DRAGON_OFI").is_ok_and(|v| v == "0") {
        return;
    }
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let Some(inc) = include_dir() else {
        // No headers: the ofi back end reports itself unavailable at run time.
        return;
    };
    println!(
        "cargo::rerun-if-changed={}",
        inc.join("rdma/fabric.h").display()
    );
    cc::Build::new()
        .file("csrc/ofi_shim.c")
        .include(&inc)
        .flag_if_supported("-std=gnu11")
        .warnings(true)
        .compile("dragon_ofi_shim");
    // The shim must not reference libfabric's exported symbols (they are loaded with
    // dlsym): check with nm when it is there.
    if let Ok(out) = std::env::var("OUT_DIR") {
        let lib = std::path::Path::new(&out).join("libdragon_ofi_shim.a");
        if let Ok(o) = Command::new("nm").arg("-u").arg(&lib).output() {
            let text = String::from_utf8_lossy(&o.stdout);
            let bad: Vec<&str> = text
                .lines()
                .filter_map(|l| l.split_whitespace().last())
                .filter(|sym| sym.starts_with("fi_"))
                .collect();
            assert!(
                bad.is_empty(),
                "csrc/ofi_shim.c links libfabric symbols directly: {bad:?}"
            );
        }
    }
    // dlopen/dlsym live in libc on glibc >= 2.34 and in libdl before; -ldl works for both.
    println!("cargo::rustc-link-lib=dl");
    println!("cargo::rustc-cfg=dragon_ofi");
}
