//! Test harness: a real PostgreSQL (the one on 127.0.0.1:5432, `QUILL_TEST_DATABASE_URL`,
//! or a throwaway cluster started from the installed binaries), a fresh database per test,
//! quill running on port 0, and a small `/ws` client.

#![allow(dead_code, unreachable_pub)]

pub mod nats;
pub mod node;
pub mod pg;
pub mod ws;

use std::net::SocketAddr;
use std::time::Duration;

use quill::Config;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use ws::Ws;

/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

/// An HTTP client that lets idle connections go before quill does: quill closes a
/// keep-alive connection after `handshake_timeout_ms` (10 s) without a request, and a
/// client that reuses it at that moment gets an incomplete message.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client")
}

/// Inserts messages with texts `from..to`, one statement each, as another program would.
pub async fn insert_messages(pool: &PgPool, from: usize, to: usize) {
    for i in from..to {
        sqlx::query("INSERT INTO messages (text) VALUES ($1)")
            .bind(i.to_string())
            .execute(pool)
            .await
            .expect("insert");
    }
}

/// The JWT secret of test instances.
pub const TEST_SECRET: &str = "test secret: 32 bytes or more, never used in production";

/// The demo with every method public and events published to everyone.
pub fn open_demo() -> Config {
    let mut config = Config::demo();
    for service in config.services.values_mut() {
        service.access = Some(quill::config::Access::All(quill::config::Rules::One("public".into())));
        service.publish = Some(vec!["anonymous".into(), "authenticated".into()]);
        service.stamp.clear();
        service.write_roles.clear();
    }
    config
}

/// A running quill over its own database.
pub struct Quill {
    pub addr: SocketAddr,
    pub db: pg::TestDb,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), quill::GatewayError>>>,
}

impl Quill {
    /// The demo services, opened up (no login needed, events to everyone), on a fresh
    /// database: for tests of everything but access control.
    pub async fn start() -> Quill {
        Self::start_with(open_demo()).await
    }

    /// The demo exactly as shipped: access rules, channels, stamps.
    pub async fn start_secure() -> Quill {
        Self::start_with(Config::demo()).await
    }

    pub async fn start_with(config: Config) -> Quill {
        let db = pg::TestDb::create().await;
        Self::start_on(db, config).await
    }

    /// Another instance on an existing database (for multi-instance tests).
    pub async fn start_on(db: pg::TestDb, config: Config) -> Quill {
        Self::start_on_with(db, config, quill::Extensions::default()).await
    }

    /// With code-defined publishers and filters.
    pub async fn start_on_with(db: pg::TestDb, mut config: Config, extensions: quill::Extensions) -> Quill {
        config.pool_size = 4;
        // A quicker fallback than the default, unless the test chose its own.
        if config.poll_interval_ms == Config::default().poll_interval_ms {
            config.poll_interval_ms = 500;
        }
        if let Some(auth) = &mut config.authentication {
            auth.jwt_secret.get_or_insert_with(|| TEST_SECRET.to_owned());
            // Every test signs its users up from 127.0.0.1, unless it tests the limit.
            if auth.rate_limit.signups_per_address == quill::config::RateLimit::default().signups_per_address {
                auth.rate_limit.signups_per_address = 100_000;
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let url = db.url.clone();
        let task = tokio::spawn(quill::run_with(config, extensions, url, listener, async move {
            let _ = stopped.await;
        }));
        let quill = Quill {
            addr,
            db,
            http: http_client(),
            stop: Some(stop),
            task: Some(task),
        };
        quill.wait_ready().await;
        quill
    }

    /// Like `start_with`, but returns quill's start-up error.
    pub async fn start_error(config: Config) -> quill::GatewayError {
        Self::start_error_on(&pg::TestDb::create().await, config).await
    }

    /// The start-up error of a quill on an existing database.
    pub async fn start_error_on(db: &pg::TestDb, config: Config) -> quill::GatewayError {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        tokio::time::timeout(
            WAIT,
            quill::run(config, db.url.clone(), listener, std::future::pending()),
        )
        .await
        .expect("start-up must fail quickly")
        .expect_err("start-up must fail")
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(r) = self.http.get(self.url("/ready")).send().await
                && r.status() == 200
            {
                return;
            }
            if self.task.as_ref().is_some_and(|t| t.is_finished()) {
                panic!("quill stopped during start-up; run with RUST_LOG=debug for details");
            }
            assert!(tokio::time::Instant::now() < deadline, "quill did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until quill's reader has recorded (for the pruner) that it read every tick
    /// there is now.
    pub async fn wait_until_reader_recorded(&self) {
        let sql = self.sql().await;
        let newest: i64 = sqlx::query_scalar("SELECT max(id) FROM quill.tick")
            .fetch_one(&sql)
            .await
            .expect("newest tick");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let read: Option<i64> = sqlx::query_scalar("SELECT max(read_tick) FROM quill.reader")
                .fetch_one(&sql)
                .await
                .expect("reader");
            if read.is_some_and(|r| r >= newest) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the reader never recorded tick {newest}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await.expect("metrics");
        response.text().await.expect("metrics body")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A plain SQL connection pool to the same database, as "another program" would use.
    pub async fn sql(&self) -> PgPool {
        PgPool::connect(&self.db.url).await.expect("connect for plain SQL")
    }

    pub async fn ws(&self) -> Ws {
        Ws::connect(&format!("ws://{}/ws", self.addr)).await
    }

    /// Sends a REST request and returns (status, JSON body).
    pub async fn rest(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, text) = self.rest_raw(method, path, body, None).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// A REST request as a logged-in user.
    pub async fn rest_as(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, text) = self.rest_raw(method, path, body, Some(token)).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// A REST request; the body as raw text (to assert on bytes).
    pub async fn rest_raw(&self, method: &str, path: &str, body: Option<Value>, token: Option<&str>) -> (u16, String) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.http.request(method, self.url(path));
        if let Some(body) = body {
            req = req.json(&body);
        }
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("body"))
    }

    /// Signs a user up through the public `users.create`; returns the created user.
    pub async fn signup(&self, email: &str, password: &str) -> Value {
        let (status, user) = self
            .rest(
                "POST",
                "/users",
                Some(serde_json::json!({"email": email, "password": password})),
            )
            .await;
        assert_eq!(status, 201, "sign-up failed: {user}");
        user
    }

    /// Logs in with the local strategy; returns the access token.
    pub async fn login(&self, email: &str, password: &str) -> String {
        let (status, auth) = self
            .rest(
                "POST",
                "/authentication",
                Some(serde_json::json!({"strategy": "local", "email": email, "password": password})),
            )
            .await;
        assert_eq!(status, 201, "login failed: {auth}");
        auth["accessToken"].as_str().expect("token").to_owned()
    }

    /// Signs up, optionally makes the user an admin (through SQL, as an operator would),
    /// and logs in. Returns (id, token).
    pub async fn user(&self, email: &str, admin: bool) -> (i64, String) {
        let user = self.signup(email, "pw-123456").await;
        let id = user["id"].as_i64().expect("id");
        if admin {
            sqlx::query("UPDATE users SET role = 'admin' WHERE id = $1")
                .bind(id)
                .execute(&self.sql().await)
                .await
                .expect("make admin");
        }
        (id, self.login(email, "pw-123456").await)
    }

    /// Stops quill and waits for it; returns the database for reuse.
    pub async fn shutdown(mut self) -> pg::TestDb {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("quill stops in time");
            result.expect("quill task").expect("quill ran without error");
        }
        std::mem::replace(&mut self.db, pg::TestDb::detached())
    }
}

impl Drop for Quill {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A seeded random source for randomized tests (splitmix64): tiny, and the same sequence for a seed on every machine and crate version.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The seeds of a randomized test: the one in `var` (to replay a failure), else `n` fresh
/// ones. The test prints each before it runs.
pub fn seeds(var: &str, n: usize) -> Vec<u64> {
    if let Ok(seed) = std::env::var(var) {
        return vec![seed.parse().unwrap_or_else(|_| panic!("{var} is a number"))];
    }
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut rng = Rng(base);
    (0..n).map(|_| rng.next()).collect()
}
