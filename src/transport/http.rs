//! The accept loop: HTTP/1.1 with upgrades (WebSockets) on every accepted TCP connection.
//!
//! Written out instead of `axum::serve` for one reason: a client must send its request
//! headers within the handshake timeout, or a few thousand idle TCP connections could hold
//! the process's file descriptors forever.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::client_addr::{ClientAddr, TrustedProxies};

/// How long shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `app` until `shutdown`, then lets requests in flight finish (within a bound).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    handshake_timeout: Duration,
    proxies: TrustedProxies,
    shutdown: CancellationToken,
) {
    let proxies = Arc::new(proxies);
    // HTTP/1 only: the auto builder's HTTP/2 sniffing runs before, and without, the
    // header-read timeout.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Events are small frames that must leave at once: no Nagle delay.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let proxies = proxies.clone();
        let service = app.clone().map_request(move |mut request: hyper::Request<Incoming>| {
            let client = ClientAddr(proxies.client(peer.ip(), request.headers()));
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            request.extensions_mut().insert(client);
            request
        });
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(tcp), TowerToHyperService::new(service));
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::debug!("some HTTP connections did not finish in time");
    }
}
