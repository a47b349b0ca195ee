//! The JavaScript client in `clients/js/`: built with its pinned TypeScript, its Node tests
//! run against a real quill, `npm pack` gives a package that imports, and the copy quill
//! serves to pages (`/quill-client.js`) is that build.

use crate::support::node::{self, chromium, npm, project};
use crate::support::pg::{TestDb, free_port};
use crate::support::{Quill, open_demo};

const CLIENT: &str = "clients/js";

async fn build() {
    node::install(CLIENT).await;
    let dir = project(CLIENT);
    tokio::task::spawn_blocking(move || npm(&dir, &["run", "build", "--silent"]))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn the_js_client_keeps_replicas_in_sync_against_a_real_quill() {
    build().await;
    let mut config = open_demo();
    // Small, so that one test can fall behind what quill replays and get a reset.
    config.limits.max_replay_changes = 50;
    let q = Quill::start_with(config).await;
    node::node_test(&q, CLIENT, &["--experimental-websocket"], "test/client.test.mjs", &[]).await;
}

#[tokio::test]
async fn npm_pack_gives_a_package_that_imports_and_quill_serves_the_same_build() {
    build().await;
    let built = std::fs::read_to_string(project(CLIENT).join("dist/index.js")).expect("built client");
    let served = include_str!("../src/transport/pages/vendor/quill-client.js");
    assert!(
        built == served,
        "src/transport/pages/vendor/quill-client.js is stale: cp clients/js/dist/index.js there"
    );

    let dir = std::env::temp_dir().join(format!("quill-client-pack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let client = project(CLIENT);
    tokio::task::spawn_blocking(move || {
        let packed = npm(&client, &["pack", "--silent", "--pack-destination", dir.to_str().expect("utf-8 path")])?;
        let tarball = dir.join(packed.trim());
        std::fs::write(dir.join("package.json"), r#"{"name": "uses-quill-client", "private": true, "type": "module"}"#)
            .map_err(|e| e.to_string())?;
        npm(&dir, &["install", "--no-audit", "--no-fund", "--loglevel=error", tarball.to_str().expect("utf-8 path")])?;
        let check = "import { connect, Replica, QuillError } from 'quill-client'; \
                     if (typeof connect !== 'function' || typeof Replica !== 'function' || typeof QuillError !== 'function') process.exit(1);";
        let out = std::process::Command::new("node")
            .args(["--input-type=module", "-e", check])
            .current_dir(&dir)
            .output()
            .map_err(|e| e.to_string())?;
        let types = dir.join("node_modules/quill-client/dist/index.d.ts");
        match (out.status.success(), types.exists()) {
            (true, true) => Ok(()),
            (ok, has_types) => Err(format!(
                "the packed client does not import ({ok}) or has no types ({has_types}): {}",
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    })
    .await
    .expect("join")
    .unwrap_or_else(|e: String| panic!("{e}"));
}

#[tokio::test]
async fn the_replica_page_follows_sql_and_survives_a_quill_restart_in_headless_chromium() {
    let Some(browser) = chromium("the_replica_page_follows_sql_and_survives_a_quill_restart_in_headless_chromium")
    else {
        return;
    };
    // The page's test starts, kills and restarts the quill binary itself.
    let db = TestDb::create().await;
    let port = free_port().to_string();
    let env = [
        ("QUILL_BIN", env!("CARGO_BIN_EXE_quill")),
        ("DATABASE_URL", db.url.as_str()),
        ("QUILL_PORT", port.as_str()),
        ("CHROMIUM", browser.as_str()),
    ];
    node::run_node(CLIENT, &[], "test/replica-page.test.mjs", &env).await;
}
