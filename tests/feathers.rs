//! Wire compatibility with the official FeathersJS v5 client packages and the example
//! pages in headless Chromium. The checks themselves are Node tests in
//! `tests/feathers-client/`; this runs them against a fresh quill.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::process::Command;

use crate::support::Quill;

fn project() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/feathers-client")
}

/// `npm ci` once per test process (the lockfile is committed; only the npm registry is used).
fn install() -> Result<(), String> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let out = std::process::Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(project())
                .output()
                .map_err(|e| format!("cannot run npm (Node 20 and npm are required): {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("npm ci failed:\n{}", String::from_utf8_lossy(&out.stderr)))
            }
        })
        .clone()
}

async fn node_test(q: &Quill, file: &str, extra_env: &[(&str, &str)]) {
    let installed = tokio::task::spawn_blocking(install).await.expect("join");
    if let Err(e) = installed {
        panic!("{e}");
    }
    let mut cmd = Command::new("node");
    cmd.args(["--test", "--test-reporter=spec", file])
        .current_dir(project())
        .env("QUILL_URL", q.url(""))
        .env("DATABASE_URL", &q.db.url)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in extra_env {
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

#[tokio::test]
async fn the_official_feathers_v5_clients_work_against_quill() {
    // Every test user logs in from 127.0.0.1: allow the suite's logins.
    let mut config = quill::Config::demo();
    if let Some(auth) = &mut config.authentication {
        auth.rate_limit.per_address = 10_000;
    }
    let q = Quill::start_with(config).await;
    node_test(&q, "conformance.test.mjs", &[]).await;
}

/// Debian's Chromium, or `QUILL_CHROMIUM`.
fn chromium() -> Option<String> {
    if let Ok(path) = std::env::var("QUILL_CHROMIUM") {
        return Some(path);
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(str::to_owned)
}

#[tokio::test]
async fn the_example_pages_work_in_headless_chromium() {
    let Some(browser) = chromium() else {
        // CI installs Chromium (.ci/run) and must run this; elsewhere say loudly why not.
        assert!(
            std::env::var_os("CI").is_none(),
            "Chromium is required in CI: apt-get install chromium"
        );
        eprintln!("SKIPPED the_example_pages_work_in_headless_chromium: no Chromium (apt-get install chromium)");
        return;
    };
    let q = Quill::start_secure().await;
    node_test(&q, "browser.test.mjs", &[("CHROMIUM", &browser)]).await;
}

#[tokio::test]
async fn a_stalled_socketio_client_is_cut_off_while_a_healthy_one_gets_everything() {
    let config = quill::Config {
        outgoing_queue: 256,
        slow_consumer_timeout_ms: 500,
        ..crate::support::open_demo()
    };
    let q = Quill::start_with(config).await;
    node_test(&q, "isolation.test.mjs", &[]).await;
}

#[tokio::test]
async fn a_feathers_client_hears_of_a_truncate() {
    let q = Quill::start().await;
    node_test(&q, "truncate.test.mjs", &[]).await;
}
