//! A private PostgreSQL cluster from the locally installed binaries, for the demo and for
//! tests on machines without a running server. `initdb` refuses to run as root, so as root
//! the cluster runs as the `postgres` user (or `nobody`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Uid, User, chown};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no PostgreSQL binaries found: install PostgreSQL (initdb, pg_ctl on PATH or under /usr/lib/postgresql/*/bin) or set DATABASE_URL"
    )]
    NoBinaries,
    #[error("running as root, but no unprivileged user (postgres or nobody) to run PostgreSQL as")]
    NoUser,
    #[error("cannot prepare the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot give the data directory {path} to the PostgreSQL user (its parents must be readable by that user)")]
    Chown {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{step} failed: {output}")]
    Command { step: &'static str, output: String },
    #[error("PostgreSQL did not accept connections on port {port} within {seconds}s")]
    NotReady { port: u16, seconds: u64 },
}

/// A running cluster; stopped when dropped.
pub struct LocalCluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    run_as: Option<(Uid, Gid)>,
}

impl LocalCluster {
    /// Initializes `dir` if it holds no cluster yet, then starts it on 127.0.0.1:`port`.
    pub fn start(dir: &Path, port: u16) -> Result<LocalCluster, ClusterError> {
        let cluster = Self::init(dir, port)?;
        cluster.serve(&[])?;
        Ok(cluster)
    }

    /// Initializes `dir` if it holds no cluster yet, without starting it (see
    /// [`LocalCluster::serve`]).
    pub fn init(dir: &Path, port: u16) -> Result<LocalCluster, ClusterError> {
        let bin = find_binaries().ok_or(ClusterError::NoBinaries)?;
        let run_as = if Uid::effective().is_root() {
            let user = User::from_name("postgres")
                .ok()
                .flatten()
                .or_else(|| User::from_name("nobody").ok().flatten())
                .ok_or(ClusterError::NoUser)?;
            Some((user.uid, user.gid))
        } else {
            None
        };
        std::fs::create_dir_all(dir).map_err(|source| ClusterError::DataDir {
            path: dir.into(),
            source,
        })?;
        let data = dir.canonicalize().map_err(|source| ClusterError::DataDir {
            path: dir.into(),
            source,
        })?;
        if let Some((uid, gid)) = run_as {
            chown(&data, Some(uid), Some(gid)).map_err(|source| ClusterError::Chown {
                path: data.clone(),
                source,
            })?;
        }
        let cluster = LocalCluster {
            bin,
            data,
            port,
            run_as,
        };
        if !cluster.data.join("PG_VERSION").exists() {
            cluster.run(
                "initdb",
                &[
                    "-D",
                    path_str(&cluster.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ],
            )?;
        }
        Ok(cluster)
    }

    /// Starts the server on 127.0.0.1 with extra settings (`ssl = on`, `hba_file`, …).
    pub fn serve(&self, settings: &[(&str, &str)]) -> Result<(), ClusterError> {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''",
            self.port
        );
        for (name, value) in settings {
            options.push_str(&format!(" -c {name}={value}"));
        }
        let log = self.data.join("postgres.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data),
                "-l",
                path_str(&log),
                "-o",
                &options,
                "-w",
                "-t",
                "30",
                "start",
            ],
        )?;
        self.wait_ready(Duration::from_secs(30))
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Makes a file the server's own (as it needs its TLS key to be), mode 0600.
    pub fn give(&self, file: &Path) -> Result<(), ClusterError> {
        use std::os::unix::fs::PermissionsExt;
        if let Some((uid, gid)) = self.run_as {
            chown(file, Some(uid), Some(gid)).map_err(|source| ClusterError::Chown {
                path: file.into(),
                source,
            })?;
        }
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).map_err(|source| ClusterError::DataDir {
            path: file.into(),
            source,
        })
    }

    /// A connection URL for `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A shell command that stops this cluster, for a watchdog that outlives this value.
    pub fn stop_command(&self) -> String {
        let pg_ctl = format!(
            "'{}' -D '{}' -m immediate stop",
            self.bin.join("pg_ctl").display(),
            self.data.display()
        );
        match self.run_as {
            Some((uid, _)) => format!(
                "setpriv --reuid={uid} --regid={} --clear-groups {pg_ctl}",
                self.run_as.map_or(0, |(_, g)| g.as_raw())
            ),
            None => pg_ctl,
        }
    }

    /// Stops the cluster (fast shutdown). Also done on drop.
    pub fn stop(&self) {
        let _ = self.run("pg_ctl", &["-D", path_str(&self.data), "-m", "fast", "-w", "stop"]);
    }

    fn wait_ready(&self, limit: Duration) -> Result<(), ClusterError> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(ClusterError::NotReady {
            port: self.port,
            seconds: limit.as_secs(),
        })
    }

    fn run(&self, step: &'static str, args: &[&str]) -> Result<(), ClusterError> {
        let mut cmd = Command::new(self.bin.join(step));
        cmd.args(args).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid.as_raw()).gid(gid.as_raw()).current_dir(&self.data);
        }
        let out = cmd.output().map_err(|e| ClusterError::Command {
            step,
            output: e.to_string(),
        })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ClusterError::Command {
                step,
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            })
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or(".")
}

/// The directory holding `initdb` and `pg_ctl`: PATH first, then the newest Debian install.
pub fn find_binaries() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}
