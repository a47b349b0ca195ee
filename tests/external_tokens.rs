//! Tokens of another issuer: RS256 and ES256 with keys made here, expiry and not-before,
//! audience and issuer, and an id space of their own.

use std::path::{Path, PathBuf};
use std::process::Command;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};

use crate::support::Quill;
use quill::Config;

const AUDIENCE: &str = "my-app";
const ISSUER: &str = "https://idp.example";

/// A key pair made with `openssl`, as an identity provider's operator would: (private PEM,
/// public PEM).
fn key_pair(algorithm: Algorithm) -> (String, String) {
    let dir = scratch_dir();
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    let genpkey: &[&str] = match algorithm {
        Algorithm::RS256 => &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        Algorithm::ES256 => &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        other => panic!("no key for {other:?}"),
    };
    openssl(genpkey, &["-out", path(&private)]);
    openssl(&["pkey", "-in", path(&private), "-pubout"], &["-out", path(&public)]);
    let read = |p: &Path| std::fs::read_to_string(p).expect("read key");
    let pair = (read(&private), read(&public));
    let _ = std::fs::remove_dir_all(&dir);
    pair
}

fn scratch_dir() -> PathBuf {
    let mut name = [0u8; 8];
    getrandom::fill(&mut name).expect("random");
    let dir = std::env::temp_dir().join(format!(
        "quill-keys-{}",
        name.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn openssl(args: &[&str], more: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .args(more)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The demo, accepting tokens signed by this public key.
async fn quill_trusting(algorithm: Algorithm, public_pem: &str) -> Quill {
    let mut config = Config::demo();
    let external = quill::config::ExternalJwt {
        algorithm: format!("{algorithm:?}"),
        secret: None,
        public_key_pem: Some(public_pem.to_owned()),
        audience: AUDIENCE.into(),
        issuer: ISSUER.into(),
        id_claim: "sub".into(),
        role_claim: Some("role".into()),
        id_prefix: "ext:".into(),
    };
    if let Some(auth) = &mut config.authentication {
        auth.external = Some(external);
    }
    Quill::start_with(config).await
}

fn sign(algorithm: Algorithm, private_pem: &str, claims: &Value) -> String {
    let key = match algorithm {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem.as_bytes()),
        _ => EncodingKey::from_ec_pem(private_pem.as_bytes()),
    }
    .expect("signing key");
    encode(&Header::new(algorithm), claims, &key).expect("sign")
}

fn claims(sub: &str, extra: Value) -> Value {
    let now = get_current_timestamp();
    let mut claims = json!({"sub": sub, "aud": AUDIENCE, "iss": ISSUER, "iat": now, "exp": now + 600});
    if let (Some(c), Value::Object(extra)) = (claims.as_object_mut(), extra) {
        c.extend(extra);
    }
    claims
}

async fn status_with(q: &Quill, token: &str) -> (u16, Value) {
    q.rest_as(token, "GET", "/messages", None).await
}

#[tokio::test]
async fn rs256_and_es256_tokens_work_end_to_end_and_bad_ones_are_refused() {
    for algorithm in [Algorithm::RS256, Algorithm::ES256] {
        let (private, public) = key_pair(algorithm);
        let q = quill_trusting(algorithm, &public).await;
        let now = get_current_timestamp();
        let good = sign(algorithm, &private, &claims("alice", json!({})));
        assert_eq!(status_with(&q, &good).await.0, 200, "{algorithm:?}");
        // Over /ws too: the claims are the connection's user.
        let mut ws = q.ws().await;
        let auth = ws.login(&good).await;
        assert_eq!(auth["user"]["sub"], "alice", "{auth}");
        let refused = [
            ("expired", claims("alice", json!({"exp": now - 5}))),
            ("not yet valid", claims("alice", json!({"nbf": now + 600}))),
            ("another audience", claims("alice", json!({"aud": "other-app"}))),
            (
                "another issuer",
                claims("alice", json!({"iss": "https://evil.example"})),
            ),
        ];
        for (why, claims) in refused {
            let token = sign(algorithm, &private, &claims);
            let (status, body) = status_with(&q, &token).await;
            assert_eq!(status, 401, "{algorithm:?} {why}: {body}");
        }
        // Signed by another key of the same kind.
        let (other_private, _) = key_pair(algorithm);
        let forged = sign(algorithm, &other_private, &claims("alice", json!({})));
        assert_eq!(status_with(&q, &forged).await.0, 401, "{algorithm:?} forged");
    }
}

#[tokio::test]
async fn an_external_user_is_never_the_local_user_with_the_same_id() {
    let (private, public) = key_pair(Algorithm::ES256);
    let q = quill_trusting(Algorithm::ES256, &public).await;
    let (local_id, local_token) = q.user("local@x.io", true).await;
    let (_, message) = q
        .rest_as(&local_token, "POST", "/messages", Some(json!({"text": "local's"})))
        .await;
    // Same `sub` as the local admin, no role claim.
    let external = sign(Algorithm::ES256, &private, &claims(&local_id.to_string(), json!({})));
    let path = format!("/messages/{}", message["id"]);
    let (status, body) = q
        .rest_as(&external, "PATCH", &path, Some(json!({"text": "taken over"})))
        .await;
    assert_eq!(status, 403, "owner:user_id must not match: {body}");
    let (status, body) = q
        .rest_as(&external, "DELETE", &format!("/users/{local_id}"), None)
        .await;
    assert_eq!(status, 403, "neither owner:id nor the local row's admin role: {body}");
    let mut ws = q.ws().await;
    let auth = ws.login(&external).await;
    assert_eq!(auth["user"]["sub"], local_id.to_string());
}
