//! The quill under test: a child process of the bench, on a fresh database, measured
//! through /proc.

use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::process::{Child, Command};

use super::{BenchError, BenchOptions};

const SECRET: &str = "quill bench secret: only for the bench's own throwaway server";
const DATABASE: &str = "quill_bench";

/// A running quill child process.
pub(super) struct Server {
    child: Child,
    pid: u32,
    pub(super) base: String,
    pub(super) ws: String,
    pub(super) db: PgPool,
    _config: tempfile_path::TempPath,
}

mod tempfile_path {
    /// A file removed when dropped.
    pub(in crate::bench) struct TempPath(pub(in crate::bench) std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// The bench's service config; `messages_publish` is the messages publish rule.
pub(super) fn config(messages_publish: &str) -> String {
    format!(
        r#"
demo_tables = true
host = "127.0.0.1"
outgoing_queue = 8192
pool_size = 16

# The bench opens tens of thousands of sockets from a few addresses, some of which only
# sit there: no connection limits, no idle timeout.
[limits]
max_connections = 1000000
connections_per_address = 1000000
ping_interval_ms = 1800000
idle_timeout_ms = 3600000

[authentication]
service = "users"

[authentication.rate_limit]
per_address = 1000000
per_username = 1000000

[services.users]
hidden = ["password"]

[services.messages]
access = "authenticated"
publish = {messages_publish}
"#
    )
}

impl Server {
    /// Creates a fresh bench database and starts `quill serve` on it. The port is picked
    /// free, but a client socket can take it before quill binds it: then try another.
    pub(super) async fn start(options: &BenchOptions, config: &str) -> Result<Server, BenchError> {
        Self::start_retrying(options, config, true).await
    }

    /// Another instance on the bench database the first one made.
    pub(super) async fn join(options: &BenchOptions, config: &str) -> Result<Server, BenchError> {
        Self::start_retrying(options, config, false).await
    }

    async fn start_retrying(options: &BenchOptions, config: &str, fresh: bool) -> Result<Server, BenchError> {
        let mut last = BenchError("quill did not start".into());
        for _ in 0..3 {
            match Self::start_once(options, config, fresh).await {
                Ok(server) => return Ok(server),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn start_once(options: &BenchOptions, config: &str, fresh: bool) -> Result<Server, BenchError> {
        if fresh {
            let mut admin = PgConnection::connect(&options.admin_url)
                .await
                .map_err(|e| BenchError::new("connecting to PostgreSQL", e))?;
            for statement in [
                format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"),
                format!("CREATE DATABASE {DATABASE}"),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(statement))
                    .execute(&mut admin)
                    .await
                    .map_err(|e| BenchError::new("creating the bench database", e))?;
            }
        }
        let db_url = match options.admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{DATABASE}"),
            None => return Err(BenchError("the admin URL must end in /<database>".into())),
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| BenchError::new("finding a free port", e))?;
        let path = std::env::temp_dir().join(format!("quill-bench-{}-{port}.toml", std::process::id()));
        std::fs::write(&path, config).map_err(|e| BenchError::new("writing the bench config", e))?;
        let exe = std::env::current_exe().map_err(|e| BenchError::new("finding the quill binary", e))?;
        let child = Command::new(exe)
            .args(["serve", "--config"])
            .arg(&path)
            .env("DATABASE_URL", &db_url)
            .env("PORT", port.to_string())
            .env("QUILL_JWT_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BenchError::new("starting quill", e))?;
        let pid = child.id().ok_or_else(|| BenchError("quill exited at once".into()))?;
        let db = PgPool::connect(&db_url)
            .await
            .map_err(|e| BenchError::new("connecting to the bench database", e))?;
        let mut server = Server {
            child,
            pid,
            base: format!("http://127.0.0.1:{port}"),
            ws: format!("ws://127.0.0.1:{port}/ws"),
            db,
            _config: tempfile_path::TempPath(path),
        };
        if let Err(e) = server.wait_ready().await {
            let _ = server.child.start_kill();
            return Err(e);
        }
        Ok(server)
    }

    async fn wait_ready(&mut self) -> Result<(), BenchError> {
        let http = reqwest::Client::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(BenchError(format!("quill exited during start-up ({status})")));
            }
            if let Ok(r) = http.get(format!("{}/ready", self.base)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(BenchError("quill did not become ready within 60 s".into()))
    }

    /// Creates `n` users through SQL (one shared password hash) and returns their ids.
    pub(super) async fn users(&self, n: usize) -> Result<Vec<i64>, BenchError> {
        let hash = crate::auth::password::hash("bench-pw".into())
            .await
            .map_err(|e| BenchError::new("hashing", e))?;
        sqlx::query_scalar(
            "INSERT INTO users (email, password)
             SELECT 'bench-' || g || '-' || clock_timestamp() || '@example.com', $2 FROM generate_series(1, $1) g
             RETURNING id",
        )
        .bind(n as i64)
        .bind(hash)
        .fetch_all(&self.db)
        .await
        .map_err(|e| BenchError::new("creating users", e))
    }

    /// A token quill accepts for this user (the bench knows the server's secret).
    pub(super) fn token(user_id: i64) -> String {
        let now = get_current_timestamp();
        let claims = json!({"sub": user_id.to_string(), "aud": "quill", "iss": "quill", "iat": now, "exp": now + 3600, "jti": "bench"});
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap_or_default()
    }

    /// CPU seconds (user + system) quill has used so far.
    pub(super) fn cpu_seconds(&self) -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return 0.0;
        };
        // Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
            .sum();
        ticks as f64 / 100.0
    }

    /// (current, peak) resident memory in KiB.
    pub(super) fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// The Prometheus text of its `/metrics`.
    pub(super) async fn metrics(&self) -> String {
        match reqwest::get(format!("{}/metrics", self.base)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    pub(super) async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        self.db.close().await;
    }
}

/// A `nats-server` with JetStream of the bench's own (the `cluster` scenario).
pub(super) struct Nats {
    _child: Child,
    pub(super) url: String,
    dir: std::path::PathBuf,
}

impl Nats {
    pub(super) async fn start() -> Result<Nats, BenchError> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| BenchError::new("finding a free port", e))?;
        let dir = std::env::temp_dir().join(format!("quill-bench-nats-{}-{port}", std::process::id()));
        let binary = if std::path::Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server"
        } else {
            "nats-server"
        };
        let child = Command::new(binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BenchError::new("starting nats-server (install the nats-server package)", e))?;
        let start = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                return Err(BenchError("nats-server did not start".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Nats {
            _child: child,
            url: format!("nats://127.0.0.1:{port}"),
            dir,
        })
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// CPU time the hypervisor took from this machine, as a share of all CPU time since
/// `Steal::start`: on a shared VM it explains runs that differ.
pub(super) struct Steal(u64, u64);

impl Steal {
    pub(super) fn start() -> Steal {
        let (steal, total) = cpu_counters();
        Steal(steal, total)
    }

    pub(super) fn percent(&self) -> f64 {
        let (steal, total) = cpu_counters();
        let total = total.saturating_sub(self.1).max(1);
        100.0 * steal.saturating_sub(self.0) as f64 / total as f64
    }
}

/// (steal, total) jiffies from /proc/stat.
fn cpu_counters() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    (fields.get(7).copied().unwrap_or(0), fields.iter().take(8).sum())
}

/// This process's open-file limit (quill inherits it).
pub(super) fn fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(0, |(soft, _)| soft)
}

/// Lets the bench (and the quill it starts, which inherits it) open tens of thousands of
/// sockets.
pub(super) fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // Two sockets per connection in this process plus one in quill: aim for 200k, which
    // root may set above the hard limit (up to fs.nr_open); otherwise take the hard limit.
    const WANTED: u64 = 200_000;
    if setrlimit(Resource::RLIMIT_NOFILE, WANTED, WANTED).is_err()
        && let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
