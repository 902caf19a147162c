//! Helpers shared by the end-to-end tests: locating test models and running the real binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

#[allow(unused_imports)]
pub use mote_testkit::{lid176_ftz, minilm_dir, shared_models, smollm2_gguf};

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

/// The Python with `openai` and `tritonclient` (scripts/test.sh sets MOTE_TEST_PYTHON).
pub fn python() -> PathBuf {
    let p = std::env::var_os("MOTE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/pyenv/bin/python")
        });
    assert!(
        p.is_file(),
        "{} is missing: run scripts/test.sh (it creates the venv with the openai and \
         tritonclient packages), or set MOTE_TEST_PYTHON",
        p.display()
    );
    p
}

pub struct Server {
    child: Option<Child>,
    pub addr: String,
}

impl Drop for Server {
    /// A failing test must not leave its server running.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Server {
    pub fn start(store: &Path, args: &[&str]) -> Server {
        Server::start_env(store, args, &[])
    }

    /// Start with extra environment variables.
    pub fn start_env(store: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = mote(store)
            .arg("serve")
            .args(args)
            .envs(env.iter().copied())
            .args(["--addr", "127.0.0.1:0"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the server prints its address before exiting")
                .unwrap();
            if let Some(a) = line.strip_prefix("listening on http://") {
                break a.to_string();
            }
        };
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child: Some(child),
            addr,
        }
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        // SIGTERM: in-flight requests are finished, then exit 0.
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The most resident memory the server has had (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, key: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }
}

/// `mote run REF --json` on one fixed sentence with `MOTE_ISA=isa` and `threads`: the
/// backend's name and the embedding's bits.
#[allow(dead_code)]
pub fn embedding_bits(
    store: &Path,
    reference: &str,
    isa: &str,
    threads: &str,
) -> (String, Vec<u32>) {
    let out: serde_json::Value =
        serde_json::from_str(&ok(mote(store).env("MOTE_ISA", isa).args([
            "run",
            reference,
            "--json",
            "--threads",
            threads,
            "--text",
            "Rust is a systems programming language focused on safety and speed.",
        ])))
        .unwrap();
    let bits = out["results"][0]["vector"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v.as_f64().unwrap() as f32).to_bits())
        .collect();
    (
        out["model"]["backend"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        bits,
    )
}
