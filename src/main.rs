//! The `quill` binary: CLI, configuration, logging, signals. Everything else is the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use quill::Config;
use quill::cluster::LocalCluster;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "quill", version, about = "A real-time gateway for PostgreSQL")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configured services (the demo without a config file).
    Serve(Options),
    /// Apply quill's migrations and exit.
    Migrate(Options),
    /// Print an API key for Supabase clients (`createClient(quillUrl, key)`), signed with
    /// the configured JWT secret.
    Token(TokenArgs),
    /// Measure latency, fan-out, the write path, connections and capture overhead against
    /// a quill this command starts on a throwaway database (builds with `--features bench`).
    #[cfg(feature = "bench")]
    Bench(BenchArgs),
}

#[cfg(feature = "bench")]
#[derive(clap::Args)]
struct BenchArgs {
    /// Admin URL of the PostgreSQL server to use (a `quill_bench` database is created).
    #[arg(
        long,
        env = "QUILL_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Scenarios to run (latency, fanout, supabase, socketio, targeted, write, connections, isolation,
    /// capture, replica, cluster); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Subscriber counts for the fan-out scenario.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    fanout: Vec<usize>,
    /// Connection counts for the idle-connections scenario.
    #[arg(long, value_delimiter = ',', default_value = "10000,50000")]
    connections: Vec<usize>,
    /// Latency scenario: subscribers.
    #[arg(long, default_value_t = 10)]
    subscribers: usize,
    /// Latency scenario: writes per second.
    #[arg(long, default_value_t = 200)]
    rate: u32,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The key's role: `anon` is an anonymous client (the only role quill gives keys for).
    #[arg(long, default_value = "anon")]
    role: String,
    /// How long the key is valid, in days (at most 36 500).
    #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u64).range(1..=36_500))]
    days: u64,
    #[command(flatten)]
    options: Options,
}

#[derive(clap::Args)]
struct Options {
    /// TOML configuration file; without one quill serves the demo (users, messages).
    #[arg(long, env = "QUILL_CONFIG")]
    config: Option<PathBuf>,
    /// PostgreSQL URL. Without it (and without `database_url` in the config) quill starts a
    /// private PostgreSQL from the installed binaries.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// HTTP port (default 3030).
    #[arg(long, env = "PORT")]
    port: Option<u16>,
    /// Where the private PostgreSQL keeps its data.
    #[arg(long, env = "QUILL_DATA_DIR", default_value = ".quill/postgres")]
    data_dir: PathBuf,
    /// Port of the private PostgreSQL (on 127.0.0.1).
    #[arg(long, env = "QUILL_PG_PORT", default_value_t = 54330)]
    pg_port: u16,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match cli.command {
        Command::Serve(opts) => runtime.block_on(serve(opts)),
        Command::Migrate(opts) => runtime.block_on(migrate(opts)),
        Command::Token(args) => token(args),
        #[cfg(feature = "bench")]
        Command::Bench(args) => runtime.block_on(async {
            let options = quill::bench::BenchOptions {
                admin_url: args.database_url,
                only: args.only,
                seconds: args.seconds,
                fanout: args.fanout,
                connections: args.connections,
                subscribers: args.subscribers,
                rate: args.rate,
            };
            quill::bench::run(options).await.map(|_| ()).context("bench failed")
        }),
    }
}

fn load_config(opts: &Options) -> anyhow::Result<Config> {
    let demo = opts.config.is_none();
    let mut config = match &opts.config {
        Some(path) => Config::from_file(path).with_context(|| format!("loading {}", path.display()))?,
        None => Config::demo(),
    };
    if let Some(auth) = &mut config.authentication {
        if let Ok(secret) = std::env::var("QUILL_JWT_SECRET")
            && !secret.is_empty()
        {
            auth.jwt_secret = Some(secret);
        }
        if auth.jwt_secret.is_none() && demo {
            auth.jwt_secret = Some(quill::auth::generate_secret().context("cannot generate a JWT secret")?);
            tracing::warn!("demo mode: generated a JWT secret; tokens stop working on restart (set QUILL_JWT_SECRET)");
        }
    }
    if let Some(port) = opts.port {
        config.port = port;
    }
    if let Some(url) = &opts.database_url {
        config.database_url = Some(url.clone());
    }
    apply_nats_env(&mut config)?;
    Ok(config)
}

/// `QUILL_NATS_URL` (comma-separated) turns the cluster on or points it elsewhere; the
/// secrets may come from the environment instead of the file.
fn apply_nats_env(config: &mut Config) -> anyhow::Result<()> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let Some(urls) = var("QUILL_NATS_URL") {
        let urls: Vec<String> = urls.split(',').map(|u| u.trim().to_owned()).collect();
        match &mut config.cluster {
            Some(cluster) => cluster.nats_url = urls,
            None => config.cluster = Some(quill::config::ClusterConfig::new_many(urls)),
        }
    }
    if let Some(cluster) = &mut config.cluster {
        if let Some(password) = var("QUILL_NATS_PASSWORD") {
            cluster.password = Some(password);
        }
        if let Some(token) = var("QUILL_NATS_TOKEN") {
            cluster.token = Some(token);
        }
    }
    config.validate().context("QUILL_NATS_* settings")?;
    Ok(())
}

/// The database URL, starting the private cluster when none is configured.
async fn database(config: &Config, opts: &Options) -> anyhow::Result<(String, Option<LocalCluster>)> {
    if let Some(url) = &config.database_url {
        return Ok((url.clone(), None));
    }
    let dir = opts.data_dir.clone();
    let port = opts.pg_port;
    tracing::info!(data_dir = %dir.display(), port, "no DATABASE_URL: starting a private PostgreSQL");
    let cluster = tokio::task::spawn_blocking(move || LocalCluster::start(&dir, port))
        .await
        .context("starting PostgreSQL")?
        .context("starting the private PostgreSQL")?;
    let admin = cluster.url("postgres");
    let pool = sqlx::PgPool::connect(&admin)
        .await
        .context("connecting to the private PostgreSQL")?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'quill')")
        .fetch_one(&pool)
        .await?;
    if !exists {
        sqlx::query("CREATE DATABASE quill").execute(&pool).await?;
    }
    pool.close().await;
    let url = cluster.url("quill");
    tracing::info!(psql = %format!("psql {url}"), "private PostgreSQL is up");
    Ok((url, Some(cluster)))
}

async fn serve(opts: Options) -> anyhow::Result<()> {
    let config = load_config(&opts)?;
    if opts.config.is_none()
        && let Some(auth) = &config.authentication
        && let Some(secret) = &auth.jwt_secret
    {
        // The demo's secret is new at every start: so is the key Supabase clients need.
        let key = quill::auth::issue_api_key(auth, secret, "anon", 30 * 86_400).context("cannot sign the demo key")?;
        tracing::info!(anon_key = %key, "demo mode: Supabase clients connect with createClient(\"http://localhost:{}\", anon_key)", config.port);
    }
    let (url, cluster) = database(&config, &opts).await?;
    let addr = std::net::SocketAddr::new(config.host, config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let result = quill::run(config, url, listener, shutdown_signal()).await;
    drop(cluster);
    result.context("quill stopped with an error")
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    if args.role != "anon" {
        anyhow::bail!("quill gives keys for role 'anon' only; a user's own login token is their access token");
    }
    let config = load_config(&args.options)?;
    let auth = config
        .authentication
        .as_ref()
        .context("the configuration has no [authentication] section")?;
    let secret = match (&args.options.config, &auth.jwt_secret) {
        (None, _) if std::env::var("QUILL_JWT_SECRET").is_err() => anyhow::bail!(
            "the demo makes a new JWT secret at every start: set QUILL_JWT_SECRET for both `quill serve` and `quill token`"
        ),
        (_, Some(secret)) => secret,
        (_, None) => anyhow::bail!("no JWT secret: set authentication.jwt_secret or QUILL_JWT_SECRET"),
    };
    let key = quill::auth::issue_api_key(auth, secret, &args.role, args.days.saturating_mul(86_400))
        .context("cannot sign the key")?;
    println!("{key}");
    Ok(())
}

async fn migrate(opts: Options) -> anyhow::Result<()> {
    let config = load_config(&opts)?;
    let (url, cluster) = database(&config, &opts).await?;
    let pool = quill::gateway::connect_and_migrate(&url, &config).await?;
    pool.close().await;
    drop(cluster);
    tracing::info!("migrations applied");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
