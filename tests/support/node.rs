//! Node test projects in the repository: `npm ci` from their committed lockfiles (the npm
//! registry only, never a browser download), then `node --test` against a running quill.
#![allow(unreachable_pub)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::process::Command;

use super::Quill;

/// A directory of the repository.
pub fn project(dir: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir)
}

/// Runs `npm <args>` in `dir`; the error names what failed.
pub fn npm(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("npm")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run npm (Node 20 and npm are required): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "npm {} failed in {}:\n{}{}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `npm ci` once per project per test process.
pub async fn install(dir: &str) {
    static INSTALLED: OnceLock<Mutex<HashMap<String, Result<(), String>>>> = OnceLock::new();
    let dir = dir.to_owned();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut done = INSTALLED
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        done.entry(dir.clone())
            .or_insert_with(|| npm(&project(&dir), &["ci", "--no-audit", "--no-fund", "--loglevel=error"]).map(drop))
            .clone()
    })
    .await
    .expect("join");
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

/// Runs `node <flags> --test <file>` in `dir` against quill (`QUILL_URL`, `DATABASE_URL`).
pub async fn node_test(q: &Quill, dir: &str, flags: &[&str], file: &str, extra_env: &[(&str, &str)]) {
    let url = q.url("");
    let mut env = vec![("QUILL_URL", url.as_str()), ("DATABASE_URL", q.db.url.as_str())];
    env.extend_from_slice(extra_env);
    run_node(dir, flags, file, &env).await;
}

/// Runs `node <flags> --test <file>` in `dir` with this environment; fails with its report.
pub async fn run_node(dir: &str, flags: &[&str], file: &str, env: &[(&str, &str)]) {
    install(dir).await;
    let mut cmd = Command::new("node");
    cmd.args(flags)
        .args(["--test", "--test-reporter=spec", file])
        .current_dir(project(dir))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("node tests finish within 5 minutes")
        .expect("node runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{file} failed:\n{report}");
    println!("{report}");
}

/// Debian's Chromium, or `QUILL_CHROMIUM`. `None` outside CI when there is none (the
/// caller says loudly that it skipped); in CI its absence fails the test.
pub fn chromium(test: &str) -> Option<String> {
    if let Ok(path) = std::env::var("QUILL_CHROMIUM") {
        return Some(path);
    }
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .map(str::to_owned);
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "Chromium is required in CI: apt-get install chromium"
        );
        eprintln!("SKIPPED {test}: no Chromium (apt-get install chromium)");
    }
    found
}
