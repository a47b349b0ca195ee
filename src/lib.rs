//! quill: a real-time gateway for PostgreSQL.
//!
//! # Layout
//! The tree follows the two directions data moves in:
//!
//! ```text
//!  a call                                   a change
//!  transport/{rest,ws}  decode              Postgres commit → trigger → quill.change_log
//!     ▼                                        ▼  (NOTIFY is only a wake-up)
//!  service/   Feathers method semantics     change/   listener (LISTEN) + log reader (ticks)
//!     ▼       query.rs: typed Query            ▼
//!  store/     the only SQL: catalog,        pipeline  change → ServiceEvent (stripped)
//!             statement builder, capture       ▼
//!     ▼                                     hub/      subscriptions, bounded queue per socket
//!  Postgres                                    ▼
//!                                           transport/ws  session → socket
//! ```
//!
//! With `[cluster]`, [`jetstream`] sits between the two halves of the change side: one
//! instance's log reader appends to a NATS JetStream stream, and every instance's pipeline
//! reads that stream instead of the log.
//!
//! [`gateway::run`] wires it together; [`cluster`] starts a private Postgres for the demo
//! and for tests.

pub mod auth;
#[cfg(feature = "bench")]
pub mod bench;
pub mod change;
pub mod channel;
pub mod cluster;
pub mod config;
pub mod error;
pub mod event;
pub mod fuzzing;
pub mod gateway;
pub mod hub;
pub mod jetstream;
pub mod metrics;
pub mod pg_tls;
pub mod pipeline;
pub mod resume;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod sync;
pub mod transport;

pub use config::Config;
pub use error::{Error, ErrorKind};
pub use event::{EventKind, ServiceEvent};
pub use gateway::{Extensions, GatewayError, run, run_with};
