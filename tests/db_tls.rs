//! TLS to PostgreSQL: a server of the test's own with `ssl = on`, a CA and a certificate
//! made here, and only TLS connections allowed. Both of quill's connection kinds (the sqlx
//! pool and the tokio-postgres LISTEN session) must honour every `sslmode`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sqlx::Connection;

use crate::support::{Quill, open_demo, pg};
use quill::cluster::LocalCluster;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for `localhost` signed by it, in `dir`; returns the CA's
/// certificate file.
fn make_certificates(dir: &Path, name: &str) -> PathBuf {
    let ca = format!("{name}-ca");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            "/CN=localhost",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
    dir.join(format!("{ca}.pem"))
}

/// Whether both connection kinds get through with this URL, as quill opens them.
async fn both_connect(url: &str) -> (bool, bool) {
    let pool = match quill::pg_tls::DbTls::from_url(url).and_then(|t| t.pool_options()) {
        Ok(options) => sqlx::PgConnection::connect_with(&options).await.is_ok(),
        Err(_) => false,
    };
    let listener = match quill::pg_tls::listener_config(url) {
        Ok((config, tls)) => match config.connect(tls).await {
            Ok((client, connection)) => {
                let driver = tokio::spawn(connection);
                let ok = client.simple_query("SELECT 1").await.is_ok();
                driver.abort();
                ok
            }
            Err(_) => false,
        },
        Err(_) => false,
    };
    (pool, listener)
}

#[tokio::test]
async fn every_sslmode_holds_for_the_pool_and_the_listen_connection() {
    let mut name = [0u8; 6];
    getrandom::fill(&mut name).expect("random");
    let root = std::env::temp_dir().join(format!(
        "quill-tls-{}",
        name.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ));
    let port = pg::free_port();
    let cluster = LocalCluster::init(&root.join("data"), port).expect("initdb");
    let data = cluster.data_dir().to_path_buf();
    let ca = make_certificates(&data, "server");
    let other_ca = make_certificates(&data, "stranger");
    std::fs::write(
        data.join("tls_hba.conf"),
        "hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
    )
    .expect("hba");
    for file in ["server.key", "server.crt", "tls_hba.conf"] {
        cluster.give(&data.join(file)).expect("give to the server");
    }
    let setting = |file: &str| format!("'{}'", data.join(file).display());
    cluster
        .serve(&[
            ("ssl", "on"),
            ("ssl_cert_file", &setting("server.crt")),
            ("ssl_key_file", &setting("server.key")),
            ("hba_file", &setting("tls_hba.conf")),
        ])
        .expect("start the TLS server");
    let url = |host: &str, query: &str| format!("postgres://postgres@{host}:{port}/postgres?{query}");
    let ca = ca.display().to_string();
    let other_ca = other_ca.display().to_string();
    let cases = [
        (
            "disable: refused by the server",
            url("localhost", "sslmode=disable"),
            false,
        ),
        ("prefer", url("localhost", "sslmode=prefer"), true),
        ("require, no CA", url("localhost", "sslmode=require"), true),
        (
            "require with a CA checks the chain",
            url("localhost", &format!("sslmode=require&sslrootcert={other_ca}")),
            false,
        ),
        (
            "require with the right CA",
            url("127.0.0.1", &format!("sslmode=require&sslrootcert={ca}")),
            true,
        ),
        (
            "verify-full",
            url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}")),
            true,
        ),
        (
            "verify-full, another CA",
            url("localhost", &format!("sslmode=verify-full&sslrootcert={other_ca}")),
            false,
        ),
        (
            "verify-full, another name",
            url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}")),
            false,
        ),
        (
            "verify-ca, another name",
            url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")),
            true,
        ),
        (
            "verify-ca, another CA",
            url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={other_ca}")),
            false,
        ),
    ];
    for (case, url, expected) in &cases {
        assert_eq!(both_connect(url).await, (*expected, *expected), "{case}: {url}");
    }
    // quill itself, verifying the server fully: it starts, listens and delivers.
    let verified = url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}"));
    let db = pg::TestDb {
        name: String::new(),
        url: verified,
    };
    let q = Quill::start_on(db, open_demo()).await;
    assert!(q.metrics().await.contains("quill_listener_connected 1"));
    let mut ws = q.ws().await;
    ws.subscribe("messages").await;
    let (status, _) = q.rest("POST", "/messages", Some(json!({"text": "over TLS"}))).await;
    assert_eq!(status, 201);
    assert_eq!(ws.next_event().await["data"]["text"], "over TLS");
    q.shutdown().await;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&root);
}
