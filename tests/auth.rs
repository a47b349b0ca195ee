//! Authentication: local and jwt strategies, tokens, passwords, rate limits.

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};

use crate::support::{Quill, TEST_SECRET};
use quill::Config;

#[tokio::test]
async fn local_login_answers_the_feathers_authentication_result() {
    let q = Quill::start_secure().await;
    let user = q.signup("ann@x.io", "correct horse").await;
    let (status, auth) = q
        .rest(
            "POST",
            "/authentication",
            Some(json!({"strategy": "local", "email": "ann@x.io", "password": "correct horse"})),
        )
        .await;
    assert_eq!(status, 201, "{auth}");
    let token = auth["accessToken"].as_str().expect("token");
    assert_eq!(auth["authentication"]["strategy"], "local");
    assert_eq!(auth["authentication"]["accessToken"], token);
    let payload = &auth["authentication"]["payload"];
    assert_eq!(payload["sub"], user["id"].to_string(), "sub is the user id as a string");
    for claim in ["iat", "exp", "aud", "iss", "jti"] {
        assert!(!payload[claim].is_null(), "payload has {claim}: {payload}");
    }
    assert_eq!(auth["user"]["email"], "ann@x.io");
    assert!(auth["user"].get("password").is_none());
    // the token works on REST, and re-authenticates with the jwt strategy
    let (status, page) = q.rest_as(token, "GET", "/users", None).await;
    assert_eq!(status, 200, "{page}");
    let (status, again) = q
        .rest(
            "POST",
            "/authentication",
            Some(json!({"strategy": "jwt", "accessToken": token})),
        )
        .await;
    assert_eq!((status, again["user"]["email"].as_str()), (201, Some("ann@x.io")));
}

#[tokio::test]
async fn wrong_password_and_unknown_email_get_identical_answers() {
    let q = Quill::start_secure().await;
    q.signup("bob@x.io", "right password").await;
    let attempt = |email: &'static str, password: &'static str| {
        let q = &q;
        async move {
            let body = json!({"strategy": "local", "email": email, "password": password});
            q.rest_raw("POST", "/authentication", Some(body), None).await
        }
    };
    let wrong_password = attempt("bob@x.io", "wrong").await;
    let unknown_email = attempt("nobody@x.io", "wrong").await;
    assert_eq!(wrong_password.0, 401);
    assert_eq!(wrong_password, unknown_email, "no user enumeration");
    let body: Value = serde_json::from_str(&wrong_password.1).expect("json");
    assert_eq!(body["name"], "NotAuthenticated");
}

fn token_with(secret: &str, claims: Value, alg: Algorithm) -> String {
    encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret.as_bytes())).expect("encode")
}

#[tokio::test]
async fn forged_expired_none_and_wrong_secret_tokens_are_rejected() {
    let q = Quill::start_secure().await;
    let (id, good) = q.user("carl@x.io", false).await;
    let now = get_current_timestamp();
    let claims =
        |exp: u64| json!({"sub": id.to_string(), "aud": "quill", "iss": "quill", "iat": now, "exp": exp, "jti": "x"});
    let expired = token_with(TEST_SECRET, claims(now - 10), Algorithm::HS256);
    let wrong_secret = token_with(
        "some other secret of enough length!!",
        claims(now + 600),
        Algorithm::HS256,
    );
    let wrong_alg = token_with(TEST_SECRET, claims(now + 600), Algorithm::HS512);
    let mut parts: Vec<&str> = good.split('.').collect();
    let forged_payload = base64_url_encode(
        &claims(now + 600)
            .to_string()
            .replace(&id.to_string(), &(id + 1).to_string()),
    );
    parts[1] = &forged_payload;
    let forged = parts.join(".");
    let none = format!(
        "{}.{}.",
        base64_url_encode(r#"{"alg":"none","typ":"JWT"}"#),
        base64_url_encode(&claims(now + 600).to_string())
    );
    for (name, token) in [
        ("expired", expired),
        ("wrong secret", wrong_secret),
        ("HS512", wrong_alg),
        ("forged", forged),
        ("alg none", none),
    ] {
        let (status, body) = q.rest_as(&token, "GET", "/users", None).await;
        assert_eq!(status, 401, "{name}: {body}");
        let mut ws = q.ws().await;
        let reply = ws
            .call(
                "create",
                "authentication",
                json!({"data": {"strategy": "jwt", "accessToken": token}}),
            )
            .await;
        assert_eq!(reply["error"]["name"], "NotAuthenticated", "{name} over ws: {reply}");
    }
    assert_eq!(q.rest_as(&good, "GET", "/users", None).await.0, 200);
}

fn base64_url_encode(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn passwords_are_hashed_on_every_write_even_when_they_look_like_hashes() {
    let q = Quill::start_secure().await;
    let (id, token) = q.user("dee@x.io", false).await;
    let stored = || async {
        sqlx::query_scalar::<_, String>("SELECT password FROM users WHERE id = $1")
            .bind(id)
            .fetch_one(&q.sql().await)
            .await
            .expect("password")
    };
    let first = stored().await;
    assert!(first.starts_with("$argon2id$"), "{first}");
    q.rest_as(
        &token,
        "PATCH",
        &format!("/users/{id}"),
        Some(json!({"password": "new secret"})),
    )
    .await;
    let second = stored().await;
    assert!(second.starts_with("$argon2id$") && second != first);
    assert!(!q.login("dee@x.io", "new secret").await.is_empty());
    // A value that looks like a hash is a password like any other: hashed, never stored.
    let (status, _) = q
        .rest_as(
            &token,
            "PATCH",
            &format!("/users/{id}"),
            Some(json!({"password": first.clone()})),
        )
        .await;
    assert_eq!(status, 200);
    let third = stored().await;
    assert!(
        third != first && third.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{third}"
    );
    assert!(
        !q.login("dee@x.io", &first).await.is_empty(),
        "its text is the password now"
    );
}

#[tokio::test]
async fn the_password_appears_in_no_response_event_select_or_error() {
    let q = Quill::start_secure().await;
    let (id, token) = q.user("eve@x.io", false).await;
    let mut ws = q.ws().await;
    ws.login(&token).await;
    ws.subscribe("users").await;
    let mut raw = Vec::new();
    for (method, path, body) in [
        ("GET", format!("/users/{id}"), None),
        ("GET", "/users".to_owned(), None),
        ("GET", "/users?$select[]=password".to_owned(), None),
        ("GET", "/users?password=pw-123456".to_owned(), None),
        ("GET", "/users?$sort[password]=1".to_owned(), None),
        ("PATCH", format!("/users/{id}"), Some(json!({"password": "pw-123456"}))),
        (
            "POST",
            "/users".to_owned(),
            Some(json!({"email": "eve@x.io", "password": "dup"})),
        ),
    ] {
        raw.push(q.rest_raw(method, &path, body, Some(&token)).await.1);
    }
    raw.push(
        ws.call("find", "users", json!({"query": {"$select": ["password"]}}))
            .await
            .to_string(),
    );
    raw.push(
        ws.call("find", "users", json!({"query": {"password": {"$gt": ""}}}))
            .await
            .to_string(),
    );
    raw.push(
        ws.call(
            "create",
            "authentication",
            json!({"data": {"strategy": "jwt", "accessToken": token}}),
        )
        .await
        .to_string(),
    );
    // the PATCH above made an event; so does a write through SQL
    sqlx::query("UPDATE users SET password = 'plain' WHERE id = $1")
        .bind(id)
        .execute(&q.sql().await)
        .await
        .expect("sql");
    raw.push(ws.next_event().await.to_string());
    raw.push(ws.next_event().await.to_string());
    for body in raw {
        // A query naming the hidden column is told it has no such column, as for any
        // unknown name (its own key echoed, never a value).
        let body = body
            .replace("'password': no such column", "")
            .replace(r#""password":"no such column""#, "");
        assert!(
            !body.contains("password") && !body.contains("argon2") && !body.contains("plain"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn logins_are_rate_limited_per_username() {
    let mut config = Config::demo();
    if let Some(auth) = &mut config.authentication {
        auth.rate_limit.per_username = 3;
    }
    let q = Quill::start_with(config).await;
    q.signup("fay@x.io", "pw-123456").await;
    let body = json!({"strategy": "local", "email": "fay@x.io", "password": "nope"});
    for _ in 0..3 {
        assert_eq!(q.rest("POST", "/authentication", Some(body.clone())).await.0, 401);
    }
    let (status, err) = q.rest("POST", "/authentication", Some(body)).await;
    assert_eq!((status, err["name"].as_str()), (429, Some("TooManyRequests")));
}

#[tokio::test]
async fn an_external_issuers_token_is_accepted_with_its_claims_mapped() {
    let mut config = Config::demo();
    let external: quill::config::ExternalJwt = toml::from_str(
        r#"
        algorithm = "HS256"
        secret = "the identity provider's shared secret"
        audience = "my-app"
        issuer = "https://idp.example"
        role_claim = "role"
        "#,
    )
    .expect("external config");
    if let Some(auth) = &mut config.authentication {
        auth.external = Some(external);
    }
    let q = Quill::start_with(config).await;
    let now = get_current_timestamp();
    let claims = |aud: &str| json!({"sub": "ext-7", "role": "admin", "aud": aud, "iss": "https://idp.example", "exp": now + 600});
    let good = token_with(
        "the identity provider's shared secret",
        claims("my-app"),
        Algorithm::HS256,
    );
    let wrong_audience = token_with(
        "the identity provider's shared secret",
        claims("other"),
        Algorithm::HS256,
    );
    let mut ws = q.ws().await;
    let auth = ws.login(&good).await;
    assert_eq!(auth["user"]["sub"], "ext-7");
    // role:admin rules apply to the mapped role
    let (status, _) = q.rest_as(&good, "GET", "/messages", None).await;
    assert_eq!(status, 200);
    assert_eq!(q.rest_as(&wrong_audience, "GET", "/messages", None).await.0, 401);
}

fn keys(value: &Value) -> Vec<String> {
    value
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn login_and_logout_answer_alike_over_rest_and_ws() {
    let q = Quill::start_secure().await;
    q.signup("same@x.io", "pw-123456").await;
    let data = json!({"strategy": "local", "email": "same@x.io", "password": "pw-123456"});
    let (status, rest_login) = q.rest("POST", "/authentication", Some(data.clone())).await;
    assert_eq!(status, 201);
    let mut ws = q.ws().await;
    let ws_login = ws.ok("create", "authentication", json!({ "data": data })).await;
    assert_eq!(keys(&rest_login), keys(&ws_login));
    assert_eq!(rest_login["user"], ws_login["user"]);
    let token = ws_login["accessToken"].as_str().expect("token").to_owned();
    // A logout naming another token is refused; one naming this one (or none) ends it.
    let reply = ws
        .call("remove", "authentication", json!({"id": "not-the-token"}))
        .await;
    assert_eq!(reply["error"]["name"], "NotAuthenticated", "{reply}");
    let ws_logout = ws.ok("remove", "authentication", json!({"id": token})).await;
    let (status, rest_logout) = q.rest_as(&token, "DELETE", "/authentication", None).await;
    assert_eq!(status, 200);
    assert_eq!(keys(&ws_logout), ["accessToken", "authentication", "user"]);
    assert_eq!(keys(&ws_logout), keys(&rest_logout));
    assert_eq!(ws_logout["accessToken"], token);
    assert_eq!(ws_logout["user"], rest_logout["user"]);
    assert!(ws_logout["user"].get("password").is_none());
    // Logged out: the next call is anonymous.
    let reply = ws.call("find", "messages", json!({})).await;
    assert_eq!(reply["error"]["name"], "NotAuthenticated", "{reply}");
}
