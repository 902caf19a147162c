//! `mote audit`: run a policy against a model (see `mote-audit`), write the reports, and
//! bind them to the model: stored as an OCI referrer whose subject is the model manifest,
//! with the report's digest journaled. `mote audit show` reads them back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use mote_audit::{Audit, InProcess, ModelRef, Policy, PolicyRef, Remote, Target};
use mote_store::oci::{ANNOTATION_CREATED, ARTIFACT_TYPE_AUDIT};
use mote_store::{ArtifactFile, Digest, Reference, Store, Task};
use serde_json::json;

use crate::cli::{open_model, parse_ref};
use crate::output;

/// Exit code of an audit that ran and found a threshold failed.
const EXIT_FAILED: u8 = 3;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    action: Option<AuditAction>,
    /// The model: `name[:tag]` or `sha256:<hex>`.
    reference: Option<String>,
    /// The policy (TOML): scenarios and thresholds; see docs/audit.md and examples/audit/.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Directory for report.json, report.md and report.html.
    #[arg(long, value_name = "DIR", default_value = "audit-report")]
    out: PathBuf,
    /// Audit a running server (`mote serve`) at this URL instead of the model in-process.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// The model's name on the server (default: the reference's name).
    #[arg(long, value_name = "NAME")]
    model_name: Option<String>,
    /// Baseline artifact for the policy's [fidelity] comparison (e.g. the fp32 model).
    #[arg(long, value_name = "REF")]
    baseline: Option<String>,
    /// Soak duration in seconds (overrides the policy's soak.duration_s).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Engine threads for the in-process model (default: the policy's, else the engine's).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Do not store the report in the store or journal it.
    #[arg(long)]
    no_store: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Internal: run the constrained deployment and write its result to FILE.
    #[arg(long, value_name = "FILE", hide = true)]
    child_constrained: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum AuditAction {
    /// Show the audits stored for a model (the latest report, or a list with --all).
    Show {
        /// The model: `name[:tag]` or `sha256:<hex>`.
        reference: String,
        /// List every audit instead of printing the latest report.
        #[arg(long)]
        all: bool,
        /// Print JSON (the latest report.json, or the list).
        #[arg(long)]
        json: bool,
    },
}

pub fn run(store: &Store, args: AuditArgs) -> Result<ExitCode> {
    if let Some(AuditAction::Show {
        reference,
        all,
        json,
    }) = &args.action
    {
        return show(store, reference, *all, *json || args.json);
    }
    let Some(reference) = args.reference.clone() else {
        bail!("give the model to audit: mote audit REF --policy FILE (or mote audit show REF)");
    };
    let Some(policy_path) = args.policy.clone() else {
        bail!("give a policy: mote audit {reference} --policy FILE (examples in examples/audit/)");
    };
    let policy = Policy::load(&policy_path)?;
    let parsed = parse_ref(&reference)?;
    let info = store
        .inspect(&parsed)
        .with_context(|| format!("cannot find {reference}"))?;
    let task: Option<Task> = match &policy.task {
        Some(t) => Some(
            t.parse()
                .map_err(|e| anyhow::anyhow!("policy {}: {e}", policy_path.display()))?,
        ),
        None => None,
    };
    let generation = mote_audit::GenerationSettings {
        max_tokens: policy.inputs.max_tokens,
        chat: policy.inputs.chat,
    };

    if let Some(out) = &args.child_constrained {
        return child(store, &reference, &policy, task, out);
    }

    let threads = args.threads.or(policy.threads);
    let (target, backend, model_threads): (Box<dyn Target>, Option<String>, Option<usize>) =
        match &args.url {
            Some(url) => {
                let name = match (&args.model_name, &parsed) {
                    (Some(n), _) => n.clone(),
                    (None, Reference::Tag(t)) => t.name().to_string(),
                    _ => bail!(
                        "auditing {reference} on a server needs --model-name (the name it is served under)"
                    ),
                };
                let max_tokens = info
                    .settings
                    .text
                    .as_ref()
                    .and_then(|t| t.max_length)
                    .map(|m| m as usize);
                let remote = Remote::connect(
                    url,
                    &name,
                    info.digest,
                    task.unwrap_or(info.settings.task),
                    max_tokens,
                    generation,
                )?;
                (Box::new(remote), None, None)
            }
            None => {
                let model = open_model(store, &reference, threads)?;
                let backend = model.backend_name().to_string();
                let n = model.threads();
                (
                    Box::new(InProcess::new(model, task, generation)?),
                    Some(backend),
                    Some(n),
                )
            }
        };
    let model_ref = ModelRef {
        reference: reference.clone(),
        digest: info.digest.to_string(),
        task: target.task().to_string(),
        format: info.settings.format.clone(),
        backend,
        threads: model_threads,
    };

    let baseline_ref = args
        .baseline
        .clone()
        .or_else(|| policy.fidelity.as_ref().and_then(|f| f.baseline.clone()));
    let baseline = match (&policy.fidelity, &baseline_ref) {
        (Some(_), Some(b)) => {
            let model = open_model(store, b, threads)?;
            let r = ModelRef {
                reference: b.clone(),
                digest: model.digest().to_string(),
                task: target.task().to_string(),
                format: model.info().settings.format.clone(),
                backend: Some(model.backend_name().to_string()),
                threads: Some(model.threads()),
            };
            Some((InProcess::new(model, task, generation)?, r))
        }
        _ => None,
    };

    let policy_bytes = std::fs::read(&policy_path)
        .with_context(|| format!("cannot read {}", policy_path.display()))?;
    let policy_ref = PolicyRef {
        path: policy_path.display().to_string(),
        digest: Digest::of(&policy_bytes).to_string(),
        name: policy.name.clone(),
        description: policy.description.clone(),
    };

    let child_dir = tempfile_dir(&args.out)?;
    let exe = std::env::current_exe().context("cannot find the mote executable")?;
    let root = store.root().to_path_buf();
    let run_child = |c: &mote_audit::policy::Constrained| {
        let out = child_dir.join("constrained.json");
        let _ = std::fs::remove_file(&out);
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("--store")
            .arg(&root)
            .arg("audit")
            .arg(&reference)
            .arg("--policy")
            .arg(&policy_path)
            .arg("--child-constrained")
            .arg(&out)
            .env_remove("MOTE_THREADS");
        mote_audit::constrained::spawn(cmd, &out, c, Duration::from_secs(900))
    };
    let audit = Audit {
        policy: &policy,
        policy_ref,
        model: model_ref,
        target: target.as_ref(),
        baseline: baseline
            .as_ref()
            .map(|(t, r)| (t as &dyn Target, r.clone())),
        constrained: if args.url.is_none() {
            Some(&run_child)
        } else {
            None
        },
        soak_duration_s: args.duration,
        progress: !args.json,
    };
    let report = audit.run()?;
    let _ = std::fs::remove_dir_all(&child_dir);
    drop(target);
    drop(baseline);

    let files = mote_audit::render(&report);
    mote_audit::write_reports(&files, &args.out)
        .with_context(|| format!("cannot write the reports into {}", args.out.display()))?;

    let mut stored = None;
    if !args.no_store {
        let annotations = BTreeMap::from([
            (ANNOTATION_CREATED.to_string(), report.finished.clone()),
            (
                "dev.mote.audit.passed".to_string(),
                report.passed.to_string(),
            ),
            (
                "dev.mote.audit.policy".to_string(),
                report.policy.digest.clone(),
            ),
            (
                "dev.mote.audit.policy.name".to_string(),
                report.policy.name.clone().unwrap_or_default(),
            ),
        ]);
        let artifacts: Vec<ArtifactFile> = files
            .iter()
            .map(|(name, media_type, bytes)| ArtifactFile {
                name: name.to_string(),
                media_type: media_type.to_string(),
                bytes: bytes.clone(),
            })
            .collect();
        let digest = store
            .attach(
                &Reference::Digest(info.digest),
                ARTIFACT_TYPE_AUDIT,
                &artifacts,
                annotations,
            )
            .context("cannot store the report")?;
        store
            .record(
                "audit",
                Some(info.digest),
                json!({
                    "report": digest,
                    "report_json": Digest::of(&files[0].2),
                    "passed": report.passed,
                    "failures": report.failures.len(),
                    "policy": report.policy.digest,
                    "target": report.target,
                }),
            )
            .context("cannot journal the audit")?;
        stored = Some(digest);
    }

    if args.json {
        output::json(&report)?;
    } else {
        for f in &report.failures {
            eprintln!("FAILED {f}");
        }
        println!(
            "audit of {reference} {}: {} checks, {} failures; reports in {}{}",
            if report.passed { "passed" } else { "FAILED" },
            report.checks.len(),
            report.failures.len(),
            args.out.display(),
            stored.map_or(String::new(), |d| format!("; stored as {d}"))
        );
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

/// A private directory beside the reports for the child's result.
fn tempfile_dir(out: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let dir = out.join(format!(".mote-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// The constrained child: limit the address space, then load and measure.
fn child(
    store: &Store,
    reference: &str,
    policy: &Policy,
    task: Option<Task>,
    out: &Path,
) -> Result<ExitCode> {
    let c = policy
        .constrained
        .clone()
        .context("the policy has no [constrained] table")?;
    if let Some(mb) = c.memory_limit_mb {
        mote_audit::constrained::limit_address_space(mb).map_err(anyhow::Error::msg)?;
    }
    let run = mote_audit::constrained::child_run(
        || open_model(store, reference, Some(c.threads)).map_err(|e| format!("{e:#}")),
        policy,
        task,
        &c,
    );
    std::fs::write(out, serde_json::to_vec(&run)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(ExitCode::SUCCESS)
}

fn show(store: &Store, reference: &str, all: bool, json: bool) -> Result<ExitCode> {
    let audits = store
        .referrers(&parse_ref(reference)?, Some(ARTIFACT_TYPE_AUDIT))
        .with_context(|| format!("cannot list the audits of {reference}"))?;
    if all {
        if json {
            output::json(&audits)?;
        } else if audits.is_empty() {
            println!("{reference} has no stored audits (run mote audit {reference} --policy FILE)");
        } else {
            for a in &audits {
                let get = |k: &str| a.annotations.get(k).map(String::as_str).unwrap_or("?");
                println!(
                    "{}  {}  {}  policy {}",
                    a.digest,
                    get(ANNOTATION_CREATED),
                    if get("dev.mote.audit.passed") == "true" {
                        "passed"
                    } else {
                        "FAILED"
                    },
                    match get("dev.mote.audit.policy.name") {
                        "" => get("dev.mote.audit.policy"),
                        n => n,
                    }
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(latest) = audits.last() else {
        bail!("{reference} has no stored audits; run mote audit {reference} --policy FILE");
    };
    let name = if json { "report.json" } else { "report.md" };
    let bytes = store.read_referrer_file(latest, name)?;
    print!("{}", String::from_utf8_lossy(&bytes));
    Ok(ExitCode::SUCCESS)
}
