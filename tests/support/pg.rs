//! Finds or starts the PostgreSQL server for the tests and hands out fresh databases.
#![allow(unreachable_pub)]

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use quill::cluster::LocalCluster;
use sqlx::{Connection, PgConnection};

static SERVER: OnceLock<String> = OnceLock::new();
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The admin URL (database `postgres`) of the server the tests use.
pub fn server_url() -> &'static str {
    SERVER.get_or_init(|| {
        if let Ok(url) = std::env::var("QUILL_TEST_DATABASE_URL") {
            return url;
        }
        let local = "127.0.0.1:5432".parse().expect("address");
        if std::net::TcpStream::connect_timeout(&local, Duration::from_millis(300)).is_ok() {
            return "postgres://postgres@127.0.0.1:5432/postgres".to_owned();
        }
        start_throwaway_cluster()
    })
}

/// Starts a cluster in a temporary directory that stops when this test process exits.
fn start_throwaway_cluster() -> String {
    let dir = std::env::temp_dir().join(format!("quill-test-pg-{}", std::process::id()));
    let port = free_port();
    let cluster = LocalCluster::start(&dir, port).expect("start a throwaway PostgreSQL");
    let url = cluster.url("postgres");
    // The cluster must outlive every test in this process, so it is never dropped; a
    // watchdog stops it once the process is gone.
    let stop = cluster.stop_command();
    std::mem::forget(cluster);
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}; rm -rf '{dir}'",
        pid = std::process::id(),
        dir = dir.display()
    );
    let _ = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    url
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A database of its own for one test; dropped (with FORCE) when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let admin = server_url();
        let mut conn = PgConnection::connect(admin).await.expect("connect to the test server");
        drop_stale(&mut conn).await;
        let name = format!(
            "quill_t_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("admin URL has no database part: {admin}"),
        };
        TestDb { name, url }
    }

    /// A placeholder that owns no database.
    pub fn detached() -> TestDb {
        TestDb {
            name: String::new(),
            url: String::new(),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let name = std::mem::take(&mut self.name);
        // Drop runs inside the test's runtime; use a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(server_url()).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}

/// Drops databases left by test processes that no longer run.
async fn drop_stale(conn: &mut PgConnection) {
    let names: Vec<String> = sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname LIKE 'quill_t_%'")
        .fetch_all(&mut *conn)
        .await
        .unwrap_or_default();
    for name in names {
        let pid = name.trim_start_matches("quill_t_").split('_').next().unwrap_or("");
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
            )))
            .execute(&mut *conn)
            .await;
        }
    }
}
