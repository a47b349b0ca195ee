//! Wire compatibility with the official FeathersJS v5 client packages and the example
//! pages in headless Chromium. The checks themselves are Node tests in
//! `tests/feathers-client/`; this runs them against a fresh quill.

use crate::support::Quill;
use crate::support::node::{self, chromium};

const PROJECT: &str = "tests/feathers-client";

async fn node_test(q: &Quill, file: &str, extra_env: &[(&str, &str)]) {
    node::node_test(q, PROJECT, &[], file, extra_env).await;
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

#[tokio::test]
async fn the_example_pages_work_in_headless_chromium() {
    let Some(browser) = chromium("the_example_pages_work_in_headless_chromium") else {
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

#[tokio::test]
async fn a_write_delay_holds_socketio_changes_back_and_sends_them_together() {
    let config = quill::Config {
        limits: quill::config::Limits {
            write_delay_ms: 1000,
            ..Default::default()
        },
        ..crate::support::open_demo()
    };
    let q = Quill::start_with(config).await;
    node_test(&q, "write_delay.test.mjs", &[("WRITE_DELAY_MS", "1000")]).await;
}
