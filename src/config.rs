//! quill's configuration: plain serde data, read from TOML, checked once by [`Config::validate`].
//!
//! Environment overrides (`DATABASE_URL`, `PORT`) are applied by the binary, not here, so
//! tests build a `Config` in code without touching the process environment.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}")]
    Parse {
        path: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration of one quill process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// PostgreSQL connection URL. `DATABASE_URL` overrides it; without either, `quill serve`
    /// starts a private demo cluster.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Address to listen on.
    #[serde(default = "default_host")]
    pub host: IpAddr,
    /// Port to listen on (`PORT` overrides it). 3030 is Feathers' default.
    #[serde(default = "default_port")]
    pub port: u16,
    /// How many connections service calls may open; quill's own work (the change reader,
    /// snapshots, retention) has a second pool of the same size, opened as needed.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Frames a WebSocket connection may have queued before it is cut off as too slow.
    #[serde(default = "default_outgoing_queue")]
    pub outgoing_queue: usize,
    /// How long delivery waits for a connection whose queue is full before cutting it off.
    #[serde(default = "default_slow_consumer_timeout_ms")]
    pub slow_consumer_timeout_ms: u64,
    /// Milliseconds between checks for changes when no wake-up arrives (a safety net only).
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// How long the change log keeps changes for clients resuming with `since`.
    #[serde(default)]
    pub retention: Retention,
    /// How often quill checks the configured tables for schema changes (at once, too, when
    /// its DDL event trigger reports one).
    #[serde(default = "default_schema_check_interval_ms")]
    pub schema_check_interval_ms: u64,
    /// What one connection, one client address and the whole process may use.
    #[serde(default)]
    pub limits: Limits,
    /// Reverse proxies (addresses or CIDR networks) whose `Forwarded` / `X-Forwarded-For`
    /// header names the client. Empty (the default): the socket's peer is the client.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// The one header the trusted proxies write the client's address into:
    /// `"x-forwarded-for"` (the default; nginx, HAProxy, AWS load balancers) or
    /// `"forwarded"` (RFC 7239). The other is ignored: proxies pass it through as the client
    /// sent it.
    #[serde(default)]
    pub proxy_header: ProxyHeader,
    /// Authentication; without it only `public` rules can ever grant.
    #[serde(default)]
    pub authentication: Option<AuthConfig>,
    /// Create the demo tables (`users`, `messages`) if they are missing.
    #[serde(default)]
    pub demo_tables: bool,
    /// The services, by name (the URL path segment).
    #[serde(default)]
    pub services: BTreeMap<String, ServiceConfig>,
    /// Several instances on NATS JetStream; absent, each instance reads the change log.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: one instance (the holder of an advisory lock) reads the change log and
/// appends it to a JetStream stream; every instance delivers from that stream.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs, one or a list (`QUILL_NATS_URL` overrides, comma-separated);
    /// `tls://` for TLS.
    #[serde(deserialize_with = "one_or_many")]
    pub nats_url: Vec<String>,
    /// NATS credentials: a user and password, or a token (`QUILL_NATS_PASSWORD`,
    /// `QUILL_NATS_TOKEN` override).
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    /// The stream (default `quill_<database>`) and the subject its changes go to (default
    /// `quill.<database>.changes`): one of each per database.
    #[serde(default)]
    pub stream: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    /// Stream replicas (1 on a single NATS server; 3 on a NATS cluster).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// How long the stream keeps changes (default one hour). Clients resume from the
    /// change log, so this only bounds how long an instance may be cut off from NATS and
    /// still continue without making its subscribers reload.
    #[serde(default = "default_stream_max_age")]
    pub max_age_seconds: u64,
    /// The most the stream may hold on the NATS server (default 1 GiB).
    #[serde(default = "default_stream_max_bytes")]
    pub max_bytes: i64,
    /// An instance this many changes behind the stream cuts its subscribers off (close
    /// code 4008, resume with `since`), so that they resume on an instance that keeps up.
    #[serde(default = "default_max_lag")]
    pub max_lag: u64,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(de)? {
        OneOrMany::One(url) => vec![url],
        OneOrMany::Many(urls) => urls,
    })
}

fn default_replicas() -> usize {
    1
}
fn default_stream_max_age() -> u64 {
    3600
}
fn default_stream_max_bytes() -> i64 {
    1 << 30
}
fn default_max_lag() -> u64 {
    100_000
}

impl ClusterConfig {
    /// A cluster on this NATS server, every other setting at its default.
    pub fn new(nats_url: impl Into<String>) -> Self {
        Self::new_many(vec![nats_url.into()])
    }

    /// A cluster on these NATS servers, every other setting at its default.
    pub fn new_many(nats_url: Vec<String>) -> Self {
        Self {
            nats_url,
            user: None,
            password: None,
            token: None,
            stream: None,
            subject: None,
            replicas: default_replicas(),
            max_age_seconds: default_stream_max_age(),
            max_bytes: default_stream_max_bytes(),
            max_lag: default_max_lag(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |why: &str| Err(ConfigError::Invalid(format!("cluster: {why}")));
        if self.nats_url.is_empty() || self.nats_url.iter().any(|u| u.trim().is_empty()) {
            return invalid("nats_url must name at least one server");
        }
        if self.token.is_some() && (self.user.is_some() || self.password.is_some()) {
            return invalid("give a token or a user and password, not both");
        }
        if self.user.is_some() != self.password.is_some() {
            return invalid("user and password go together");
        }
        if let Some(stream) = &self.stream
            && (stream.is_empty()
                || !stream
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        {
            return invalid("stream may hold only letters, digits, '_' and '-'");
        }
        if let Some(subject) = &self.subject
            && (subject
                .split('.')
                .any(|token| token.is_empty() || token.contains(['*', '>']) || token.chars().any(char::is_whitespace)))
        {
            return invalid("subject must be dot-separated tokens without wildcards or spaces");
        }
        if self.replicas == 0 || self.replicas > 5 {
            return invalid("replicas must be 1 to 5");
        }
        if self.max_age_seconds == 0 || self.max_bytes < 1 << 20 || self.max_lag == 0 {
            return invalid("max_age_seconds and max_lag must be at least 1, max_bytes at least 1 MiB");
        }
        Ok(())
    }
}

/// Change-log retention. A change is deleted once it is older than `max_age_seconds` or
/// more than `max_events` newer changes exist, whichever comes first.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Keep changes at least this long (default one day).
    #[serde(default = "default_max_age")]
    pub max_age_seconds: u64,
    /// Keep at most this many changes (default one million).
    #[serde(default = "default_max_events")]
    pub max_events: u64,
    /// Seconds between pruning runs.
    #[serde(default = "default_prune_interval")]
    pub prune_interval_seconds: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age_seconds: default_max_age(),
            max_events: default_max_events(),
            prune_interval_seconds: default_prune_interval(),
        }
    }
}

fn default_max_age() -> u64 {
    86_400
}
fn default_max_events() -> u64 {
    1_000_000
}
fn default_prune_interval() -> u64 {
    60
}

/// Per-connection and per-process limits. Connections are WebSockets at `/ws` and
/// socket.io sockets; REST requests are bounded by the pool and `handshake_timeout_ms`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Calls one connection may have in flight; past it quill stops reading its socket
    /// until one finishes, so a client that writes without reading cannot grow memory.
    pub calls_in_flight: usize,
    /// Connections the process serves at once; more are refused (HTTP 503).
    pub max_connections: usize,
    /// Connections one client address may hold; more are refused (HTTP 429).
    pub connections_per_address: usize,
    /// How often quill pings an idle WebSocket.
    pub ping_interval_ms: u64,
    /// A WebSocket that sends nothing (not even a pong) for this long is closed (4009).
    pub idle_timeout_ms: u64,
    /// A write to a socket that takes longer than this cuts the connection off (4008).
    pub write_timeout_ms: u64,
    /// How long a WebSocket (`/ws`, socket.io, Supabase) waits after an event reaches its
    /// queue with no backlog (less than a batch of 64 frames) before writing, so that events
    /// arriving meanwhile go out in the same write. 0 (the default) writes at once. Trades
    /// up to this much latency for fewer socket writes, each of which costs the kernel
    /// microseconds.
    pub write_delay_ms: u64,
    /// How long a client may take to send its HTTP request headers (the upgrade too).
    pub handshake_timeout_ms: u64,
    /// The most changes one resume with `since` may replay; further behind gets `Gone`.
    pub max_replay_changes: u64,
    /// The most rows a `find` on a service with `paginate = false` returns (`$limit` may
    /// ask for fewer).
    pub max_find_rows: u64,
    /// Snapshot subscriptions read at once (each holds a database connection while it
    /// reads); more wait their turn. At most the pool size less one.
    pub snapshots_in_flight: usize,
}

/// The longest `limits.write_delay_ms`: past this a delay is a misconfiguration, not a trade.
const MAX_WRITE_DELAY_MS: u64 = 1_000;

impl Default for Limits {
    fn default() -> Self {
        Self {
            calls_in_flight: 32,
            max_connections: 100_000,
            connections_per_address: 1_000,
            ping_interval_ms: 20_000,
            idle_timeout_ms: 60_000,
            write_timeout_ms: 10_000,
            write_delay_ms: 0,
            handshake_timeout_ms: 10_000,
            max_replay_changes: 1_000_000,
            max_find_rows: 10_000,
            snapshots_in_flight: 4,
        }
    }
}

impl Limits {
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
    pub fn write_delay(&self) -> Duration {
        Duration::from_millis(self.write_delay_ms)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// One service: a table exposed through the Feathers methods.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The table, as `table` or `schema.table`. Defaults to the service name in `public`.
    #[serde(default)]
    pub table: Option<String>,
    /// The primary key column.
    #[serde(default = "default_id")]
    pub id: String,
    /// Which methods may work on many rows at once (array create, patch/remove without id):
    /// `true`, `false` (the default, as in Feathers) or a list such as `["create", "patch"]`.
    #[serde(default)]
    pub multi: Multi,
    /// Page sizes for `find`, or `false` for a plain array.
    #[serde(default)]
    pub paginate: Paginate,
    /// Columns that never leave quill: removed from every response and every event.
    #[serde(default)]
    pub hidden: Vec<String>,
    /// Who may call each method: one rule list for all methods, or per method
    /// (`find`, `get`, `create`, `update`, `patch`, `remove`). Rules: `public`,
    /// `authenticated`, `owner:<column>`, `role:<name>`, `none`; several rules mean any of
    /// them. Default: `authenticated` (and `public` for `create` on the users service).
    #[serde(default)]
    pub access: Option<Access>,
    /// Channels that receive this service's events, templated from the row:
    /// `["authenticated"]` (the default), `["users/{user_id}", "roles/admin"]`, or `[]`.
    #[serde(default)]
    pub publish: Option<Vec<String>>,
    /// Columns the server sets from the caller, e.g. `{ user_id = "id" }`: set on create and
    /// update, never taken from the client.
    #[serde(default)]
    pub stamp: BTreeMap<String, String>,
    /// Columns only some roles may write, e.g. `{ role = ["admin"] }`.
    #[serde(default)]
    pub write_roles: BTreeMap<String, Vec<String>>,
    /// Columns only some readers may see, e.g. `{ email = ["owner:id", "role:admin"] }`.
    #[serde(default)]
    pub visible_to: BTreeMap<String, Vec<String>>,
    /// Whether clients may choose the id (and any other identity or serial column) on
    /// create. Default: only when the id column has no default, so nothing else could set it.
    #[serde(default)]
    pub client_ids: Option<bool>,
    /// Whether a multi `patch` or `remove` may go without a query (every row the caller may
    /// reach). Default `false`: such a call is refused, so a forgotten filter cannot empty
    /// the table.
    #[serde(default)]
    pub multi_all_rows: bool,
}

/// Which forwarding header trusted proxies write.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyHeader {
    #[default]
    XForwardedFor,
    Forwarded,
}

/// A service's `access` setting.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Access {
    All(Rules),
    PerMethod(MethodRules),
}

/// Rules per method; a method left out gets the default.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MethodRules {
    pub find: Option<Rules>,
    pub get: Option<Rules>,
    pub create: Option<Rules>,
    pub update: Option<Rules>,
    pub patch: Option<Rules>,
    pub remove: Option<Rules>,
}

/// One rule or a list of rules (any of them grants).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Rules {
    One(String),
    Many(Vec<String>),
}

impl Rules {
    pub fn list(&self) -> Vec<String> {
        match self {
            Rules::One(rule) => vec![rule.clone()],
            Rules::Many(rules) => rules.clone(),
        }
    }
}

/// Authentication: local (email + password) and JWT, Feathers-shaped.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The service whose rows are the users.
    #[serde(default = "default_auth_service")]
    pub service: String,
    #[serde(default = "default_username_field")]
    pub username_field: String,
    /// Hashed with argon2id on every write, never sent to a client.
    #[serde(default = "default_password_field")]
    pub password_field: String,
    /// The column holding the user's role (for `role:` rules and `roles/<role>` channels).
    #[serde(default)]
    pub role_field: Option<String>,
    /// HS256 secret for quill's tokens. `QUILL_JWT_SECRET` overrides it. Required unless
    /// quill runs the demo, which generates one.
    #[serde(default)]
    pub jwt_secret: Option<String>,
    /// Token lifetime in seconds (default one day, as in Feathers).
    #[serde(default = "default_expires_in")]
    pub expires_in_seconds: u64,
    #[serde(default = "default_audience")]
    pub audience: String,
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// Failed logins allowed per minute per client address and per username; sign-ups per
    /// client address.
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// The costliest stored password hash quill will check.
    #[serde(default)]
    pub password_hash: HashLimits,
    /// Tokens of another issuer accepted as well.
    #[serde(default)]
    pub external: Option<ExternalJwt>,
}

/// Login and sign-up rate limits, per minute. Logins count failed attempts only.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Failed logins from one client address.
    #[serde(default = "default_per_address")]
    pub per_address: u32,
    /// Failed logins for one username.
    #[serde(default = "default_per_username")]
    pub per_username: u32,
    /// Sign-ups (creates on the users service by a caller who is not logged in) from one
    /// client address.
    #[serde(default = "default_signups_per_address")]
    pub signups_per_address: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_address: default_per_address(),
            per_username: default_per_username(),
            signups_per_address: default_signups_per_address(),
        }
    }
}

/// The costliest stored password hash quill runs (a hash imported through SQL with higher
/// parameters is refused unchecked). quill's own hashes are argon2id m=19456 KiB, t=2, p=1.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HashLimits {
    pub max_memory_kib: u32,
    pub max_time_cost: u32,
    pub max_parallelism: u32,
}

impl Default for HashLimits {
    fn default() -> Self {
        Self {
            max_memory_kib: 65_536,
            max_time_cost: 8,
            max_parallelism: 4,
        }
    }
}

/// An external issuer's tokens, mapped to a connection user by claims.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalJwt {
    /// `HS256`, `HS384`, `HS512`, `RS256`, `RS384`, `RS512`, `ES256` or `ES384`.
    pub algorithm: String,
    /// Shared secret for HS* algorithms.
    #[serde(default)]
    pub secret: Option<String>,
    /// PEM public key for RS*/ES* algorithms.
    #[serde(default)]
    pub public_key_pem: Option<String>,
    /// The `aud` and `iss` every token must carry (required: a provider signs tokens for
    /// many apps with one key).
    pub audience: String,
    pub issuer: String,
    /// The claim holding the user id (default `sub`) and the role (optional).
    #[serde(default = "default_id_claim")]
    pub id_claim: String,
    #[serde(default)]
    pub role_claim: Option<String>,
    /// Put before the id claim to make the connection's user id (default `ext:`), so an
    /// external user is never the local user with the same id: `owner:` rules, stamps and
    /// `users/<id>` channels see `ext:<sub>`. Must not be empty.
    #[serde(default = "default_external_id_prefix")]
    pub id_prefix: String,
}

impl ServiceConfig {
    /// `(schema, table)` of this service's table.
    pub fn table_name(&self, service: &str) -> (String, String) {
        match self.table.as_deref() {
            Some(t) => match t.split_once('.') {
                Some((schema, table)) => (schema.to_owned(), table.to_owned()),
                None => ("public".to_owned(), t.to_owned()),
            },
            None => ("public".to_owned(), service.to_owned()),
        }
    }
}

/// Feathers' `multi` option.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Multi {
    All(bool),
    Methods(Vec<String>),
}

impl Default for Multi {
    fn default() -> Self {
        Multi::All(false)
    }
}

impl Multi {
    pub fn allows(&self, method: &str) -> bool {
        match self {
            Multi::All(all) => *all,
            Multi::Methods(methods) => methods.iter().any(|m| m == method),
        }
    }
}

/// Feathers' `paginate` option.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Paginate {
    /// `paginate = false` gives plain arrays; `true` is the same as the default sizes.
    Enabled(bool),
    Sizes {
        default: u32,
        max: u32,
    },
}

impl Default for Paginate {
    fn default() -> Self {
        Paginate::Sizes { default: 10, max: 50 }
    }
}

impl Paginate {
    /// `(default, max)` page sizes, or `None` when pagination is off.
    pub fn sizes(self) -> Option<(u32, u32)> {
        match self {
            Paginate::Enabled(false) => None,
            Paginate::Enabled(true) => Some((10, 50)),
            Paginate::Sizes { default, max } => Some((default, max)),
        }
    }
}

const DEMO: &str = include_str!("demo.toml");

fn default_auth_service() -> String {
    "users".into()
}
fn default_username_field() -> String {
    "email".into()
}
fn default_password_field() -> String {
    "password".into()
}
fn default_expires_in() -> u64 {
    86_400
}
fn default_audience() -> String {
    "quill".into()
}
fn default_issuer() -> String {
    "quill".into()
}
fn default_per_address() -> u32 {
    100
}
fn default_per_username() -> u32 {
    10
}
fn default_signups_per_address() -> u32 {
    10
}
fn default_external_id_prefix() -> String {
    "ext:".to_owned()
}
fn default_id_claim() -> String {
    "sub".into()
}

/// Paths quill serves itself, so no service may take them.
const RESERVED_PATHS: [&str; 6] = ["authentication", "ws", "health", "ready", "metrics", "socket.io"];

fn default_host() -> IpAddr {
    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
}
fn default_port() -> u16 {
    3030
}
fn default_pool_size() -> u32 {
    10
}
fn default_outgoing_queue() -> usize {
    1024
}
fn default_slow_consumer_timeout_ms() -> u64 {
    2000
}
fn default_poll_interval_ms() -> u64 {
    2000
}
fn default_schema_check_interval_ms() -> u64 {
    5000
}
fn default_id() -> String {
    "id".to_owned()
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: None,
            host: default_host(),
            port: default_port(),
            pool_size: default_pool_size(),
            outgoing_queue: default_outgoing_queue(),
            slow_consumer_timeout_ms: default_slow_consumer_timeout_ms(),
            poll_interval_ms: default_poll_interval_ms(),
            retention: Retention::default(),
            schema_check_interval_ms: default_schema_check_interval_ms(),
            limits: Limits::default(),
            trusted_proxies: Vec::new(),
            proxy_header: ProxyHeader::default(),
            authentication: None,
            demo_tables: false,
            services: BTreeMap::new(),
            cluster: None,
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: "<inline>".into(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The demo: the `users` and `messages` tables of the Feathers real-time guide.
    pub fn demo() -> Self {
        // The embedded demo config is tested below; it cannot fail to parse.
        toml::from_str(DEMO).unwrap_or_default()
    }

    /// Checks what can be checked without a database. Table and column names are checked
    /// against the catalog at start-up.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        if self.outgoing_queue == 0 {
            return Err(ConfigError::Invalid("outgoing_queue must be at least 1".into()));
        }
        if self.retention.max_events == 0 || self.retention.prune_interval_seconds == 0 {
            return Err(ConfigError::Invalid(
                "retention: max_events and prune_interval_seconds must be at least 1".into(),
            ));
        }
        let l = &self.limits;
        if l.calls_in_flight == 0
            || l.max_connections == 0
            || l.connections_per_address == 0
            || l.ping_interval_ms == 0
            || l.write_timeout_ms == 0
            || l.handshake_timeout_ms == 0
            || l.max_find_rows == 0
            || l.snapshots_in_flight == 0
        {
            return Err(ConfigError::Invalid(
                "limits: calls_in_flight, max_connections, connections_per_address, ping_interval_ms, write_timeout_ms, handshake_timeout_ms, max_find_rows and snapshots_in_flight must be at least 1".into(),
            ));
        }
        if l.write_delay_ms > MAX_WRITE_DELAY_MS || l.write_delay_ms >= l.write_timeout_ms {
            return Err(ConfigError::Invalid(format!(
                "limits: write_delay_ms must be below write_timeout_ms and at most {MAX_WRITE_DELAY_MS}: it delays every event"
            )));
        }
        if l.idle_timeout_ms <= l.ping_interval_ms {
            return Err(ConfigError::Invalid(
                "limits: idle_timeout_ms must be longer than ping_interval_ms".into(),
            ));
        }
        if self.pool_size == 0 {
            return Err(ConfigError::Invalid("pool_size must be at least 1".into()));
        }
        for (name, service) in &self.services {
            let valid_name =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid_name || RESERVED_PATHS.contains(&name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "service name '{name}' must be letters, digits, '_' or '-' and not one of {RESERVED_PATHS:?}"
                )));
            }
            if let Some((default, max)) = service.paginate.sizes()
                && (default == 0 || max == 0 || default > max)
            {
                return Err(ConfigError::Invalid(format!(
                    "service '{name}': paginate needs 0 < default <= max"
                )));
            }
            if let Multi::Methods(methods) = &service.multi
                && let Some(bad) = methods
                    .iter()
                    .find(|m| !["create", "patch", "remove"].contains(&m.as_str()))
            {
                return Err(ConfigError::Invalid(format!(
                    "service '{name}': multi method '{bad}' must be create, patch or remove"
                )));
            }
            if service.hidden.contains(&service.id) {
                return Err(ConfigError::Invalid(format!(
                    "service '{name}': the id column '{}' cannot be hidden",
                    service.id
                )));
            }
        }
        Ok(())
    }

    pub fn slow_consumer_timeout(&self) -> Duration {
        Duration::from_millis(self.slow_consumer_timeout_ms)
    }

    pub fn schema_check_interval(&self) -> Duration {
        Duration::from_millis(self.schema_check_interval_ms.max(100))
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms.max(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_delay_is_bounded_by_a_second_and_by_the_write_timeout() {
        let with = |limits: &str| Config::from_toml(&format!("[limits]\n{limits}"));
        assert_eq!(Config::default().limits.write_delay_ms, 0);
        let ok = with("write_delay_ms = 1000").expect("a second is allowed");
        assert_eq!(ok.limits.write_delay(), Duration::from_secs(1));
        for bad in ["write_delay_ms = 1001", "write_delay_ms = 500\nwrite_timeout_ms = 500"] {
            assert!(
                matches!(with(bad), Err(ConfigError::Invalid(_))),
                "{bad} must be refused"
            );
        }
    }

    #[test]
    fn cluster_takes_one_url_or_a_list_and_checks_its_settings() {
        let one = Config::from_toml("[cluster]\nnats_url = \"nats://a:4222\"").expect("one url");
        let cluster = one.cluster.expect("cluster");
        assert_eq!(cluster.nats_url, vec!["nats://a:4222"]);
        assert_eq!(
            (cluster.replicas, cluster.max_age_seconds, cluster.max_lag),
            (1, 3600, 100_000)
        );
        let many = Config::from_toml("[cluster]\nnats_url = [\"nats://a:4222\", \"nats://b:4222\"]").expect("a list");
        assert_eq!(many.cluster.expect("cluster").nats_url.len(), 2);
        for bad in [
            "nats_url = []",
            "nats_url = \"nats://a\"\ntoken = \"t\"\nuser = \"u\"\npassword = \"p\"",
            "nats_url = \"nats://a\"\nuser = \"u\"",
            "nats_url = \"nats://a\"\nstream = \"a.b\"",
            "nats_url = \"nats://a\"\nsubject = \"quill.*\"",
            "nats_url = \"nats://a\"\nreplicas = 0",
            "nats_url = \"nats://a\"\nmax_bytes = 10",
            "nats_url = \"nats://a\"\nsurprise = 1",
        ] {
            assert!(
                Config::from_toml(&format!("[cluster]\n{bad}")).is_err(),
                "accepted: {bad}"
            );
        }
        assert!(
            Config::default().cluster.is_none(),
            "no [cluster]: one instance as before"
        );
    }

    #[test]
    fn parses_a_service_with_every_option() {
        let c = Config::from_toml(
            r#"
            port = 4000
            [services.posts]
            table = "blog.posts"
            id = "post_id"
            multi = ["create", "patch"]
            paginate = { default = 5, max = 20 }
            hidden = ["secret"]
            "#,
        )
        .expect("valid config");
        let s = &c.services["posts"];
        assert_eq!(s.table_name("posts"), ("blog".into(), "posts".into()));
        assert!(s.multi.allows("patch") && !s.multi.allows("remove"));
        assert_eq!(s.paginate.sizes(), Some((5, 20)));
        assert_eq!(c.port, 4000);
    }

    #[test]
    fn the_demo_config_parses_and_validates() {
        let demo: Config = toml::from_str(DEMO).expect("demo.toml parses");
        demo.validate().expect("demo.toml is valid");
        assert!(demo.demo_tables);
        assert_eq!(demo.services["messages"].stamp["user_id"], "id");
        assert!(demo.authentication.is_some());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::from_toml("[services.a]\ntabel = \"x\"").expect_err("typo must fail");
        assert!(err.to_string().contains("invalid config"), "{err}");
    }

    #[test]
    fn paginate_false_gives_plain_arrays() {
        let c = Config::from_toml("[services.a]\npaginate = false").expect("valid");
        assert_eq!(c.services["a"].paginate.sizes(), None);
    }

    #[test]
    fn bad_multi_method_is_rejected() {
        assert!(Config::from_toml("[services.a]\nmulti = [\"find\"]").is_err());
    }
}
