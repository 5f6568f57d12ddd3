//! Embeds the datapath object built by `cargo xtask build-ebpf`
//! (target/bpfel-unknown-none/release/lb-ebpf, or $LB_EBPF_OBJECT).
//! Without it the binary still builds, and `lb run` says how to fix that,
//! so unit tests and `cargo check` need no nightly toolchain.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let object = env::var_os("LB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/bpfel-unknown-none/release/lb-ebpf"));
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("lb-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {}; run `cargo xtask build-ebpf` first (lb run will refuse to start)",
                object.display()
            );
            fs::write(&out, []).unwrap();
        }
    }
}
