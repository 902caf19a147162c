//! Helpers shared by the end-to-end tests: locating test models and running the real binary.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

#[allow(unused_imports)]
pub use mote_testkit::{minilm_dir, shared_models, smollm2_gguf};

/// A `mote` command bound to a store directory, with no inherited MOTE_HOME.
pub fn mote(store: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mote"));
    cmd.env_remove("MOTE_HOME").arg("--store").arg(store);
    cmd
}

/// Run and require success; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("mote runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Run and require exit code `code`; returns the output. Never accepts a panic.
pub fn fails(cmd: &mut Command, code: i32) -> Output {
    let out = cmd.output().expect("mote runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{cmd:?}: expected exit {code}\nstdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr.contains("panicked"), "{cmd:?} panicked: {stderr}");
    out
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Import and return the printed digest.
pub fn import(store: &Path, source: &Path, name: &str, extra: &[&str]) -> String {
    let out = ok(mote(store)
        .arg("import")
        .arg(source)
        .args(["--name", name])
        .args(extra));
    let digest = out.trim().to_string();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "not a digest: {digest:?}"
    );
    digest
}
