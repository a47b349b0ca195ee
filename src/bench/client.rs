//! The bench's clients: `/ws` connections from many loopback source addresses, and
//! receivers that time each event from the send time written into its row.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{WebSocketStream, client_async};
use tokio_util::sync::CancellationToken;

use super::BenchError;

pub(super) type Socket = WebSocketStream<TcpStream>;

/// One clock for writers and readers in this process.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The text of a timed message: the send time, read back by receivers.
pub(super) fn stamp() -> String {
    stamped().1
}

/// The send time (nanoseconds since the bench's epoch) and the text that carries it.
pub(super) fn stamped() -> (u64, String) {
    let sent = u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX);
    (sent, format!("bench {sent}"))
}

/// The stamp in a frame, if the frame carries one, and the time since.
fn age(frame: &str) -> Option<(u64, Duration)> {
    let start = frame.find("\"bench ")? + 7;
    let digits: String = frame[start..].chars().take_while(char::is_ascii_digit).collect();
    let sent: u64 = digits.parse().ok()?;
    Some((sent, epoch().elapsed().saturating_sub(Duration::from_nanos(sent))))
}

/// Opens `/ws`, from 127.0.0.(2 + i % 200) so that tens of thousands of connections do not
/// run out of one address's ephemeral ports. Gives up after 10 s (a server out of file
/// descriptors leaves handshakes hanging).
pub(super) async fn connect(url: &str, i: usize) -> Result<Socket, BenchError> {
    connect_with_buffer(url, i, None).await
}

/// `connect`, with a receive buffer of `recv_buffer` bytes (a small one makes a socket that
/// stops reading back up at once, as a slow mobile client's would).
async fn connect_with_buffer(url: &str, i: usize, recv_buffer: Option<u32>) -> Result<Socket, BenchError> {
    tokio::time::timeout(Duration::from_secs(10), connect_now(url, i, recv_buffer))
        .await
        .map_err(|_| BenchError("connect timed out".into()))?
}

async fn connect_now(url: &str, i: usize, recv_buffer: Option<u32>) -> Result<Socket, BenchError> {
    let target: SocketAddr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| BenchError(format!("bad ws url {url}")))?;
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 200) as u8));
    let socket = TcpSocket::new_v4().map_err(|e| BenchError::new("socket", e))?;
    if let Some(size) = recv_buffer {
        socket
            .set_recv_buffer_size(size)
            .map_err(|e| BenchError::new("receive buffer", e))?;
    }
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| BenchError::new("bind", e))?;
    let stream = socket
        .connect(target)
        .await
        .map_err(|e| BenchError::new("connect", e))?;
    stream.set_nodelay(true).map_err(|e| BenchError::new("nodelay", e))?;
    let (ws, _) = client_async(url, stream)
        .await
        .map_err(|e| BenchError::new("ws handshake", e))?;
    Ok(ws)
}

/// Sends requests and waits for all their replies (events are skipped).
pub(super) async fn request(ws: &mut Socket, requests: &[String]) -> Result<(), BenchError> {
    for r in requests {
        ws.send(Message::text(r.as_str()))
            .await
            .map_err(|e| BenchError::new("ws send", e))?;
    }
    let mut replies = 0;
    while replies < requests.len() {
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| BenchError("no reply within 30 s".into()))?;
        match frame {
            Some(Ok(Message::Text(t))) if t.contains("\"ref\"") => {
                if t.contains("\"error\"") {
                    return Err(BenchError(format!("request failed: {t}")));
                }
                replies += 1;
            }
            Some(Ok(_)) => {}
            other => return Err(BenchError(format!("socket closed: {other:?}"))),
        }
    }
    Ok(())
}

/// The protocol a subscriber speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    /// quill's `/ws`.
    Ws,
    /// Supabase Realtime (Phoenix channels, `vsn=2.0.0`, as realtime-js speaks it).
    Phoenix,
    /// The Feathers socket.io protocol (Engine.IO 4 on a WebSocket, as
    /// `@feathersjs/socketio-client` speaks it with `transports: ['websocket']`).
    SocketIo,
}

/// Logs in with a token and subscribes to messages' `created` events.
pub(super) async fn subscriber(url: &str, i: usize, token: &str) -> Result<Socket, BenchError> {
    subscribe(connect(url, i).await?, token).await
}

/// A subscriber in `protocol`; `url` is the server's `/ws` URL.
pub(super) async fn subscriber_in(protocol: Protocol, url: &str, i: usize, token: &str) -> Result<Socket, BenchError> {
    match protocol {
        Protocol::Ws => subscriber(url, i, token).await,
        Protocol::Phoenix => phoenix_subscriber(url, i, token).await,
        Protocol::SocketIo => socketio_subscriber(url, i, token).await,
    }
}

/// Opens a Feathers socket.io connection and logs in with the token. A socket.io socket is
/// subscribed to every service; its channels decide what it gets.
async fn socketio_subscriber(ws_url: &str, i: usize, token: &str) -> Result<Socket, BenchError> {
    let root = ws_url.trim_end_matches("/ws");
    let mut ws = connect(&format!("{root}/socket.io/?EIO=4&transport=websocket"), i).await?;
    // Engine.IO open packet, then the namespace connect and its answer.
    next_text(&mut ws, |t| t.starts_with('0')).await?;
    ws.send(Message::text("40"))
        .await
        .map_err(|e| BenchError::new("ws send", e))?;
    next_text(&mut ws, |t| t.starts_with("40")).await?;
    let login = format!(r#"420["create","authentication",{{"strategy":"jwt","accessToken":"{token}"}}]"#);
    ws.send(Message::text(login))
        .await
        .map_err(|e| BenchError::new("ws send", e))?;
    // A success ack is `[null, result]`; an error ack is the error alone.
    let ack = next_text(&mut ws, |t| t.starts_with("430")).await?;
    if !ack.starts_with("430[null,") {
        return Err(BenchError(format!("socket.io login failed: {ack}")));
    }
    Ok(ws)
}

/// The next text frame for which `wanted` holds; other frames are skipped.
async fn next_text(ws: &mut Socket, wanted: impl Fn(&str) -> bool) -> Result<String, BenchError> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| BenchError("no reply within 30 s".into()))?;
        match frame {
            Some(Ok(Message::Text(t))) if wanted(&t) => return Ok(t.to_string()),
            Some(Ok(_)) => {}
            other => return Err(BenchError(format!("socket closed: {other:?}"))),
        }
    }
}

/// Joins a Supabase channel with one INSERT binding on messages (the user's token as the
/// API key) and waits until it is live.
async fn phoenix_subscriber(ws_url: &str, i: usize, token: &str) -> Result<Socket, BenchError> {
    let root = ws_url.trim_end_matches("/ws");
    let mut ws = connect(&format!("{root}/realtime/v1/websocket?apikey={token}&vsn=2.0.0"), i).await?;
    let join = r#"["1","1","realtime:bench","phx_join",{"config":{"broadcast":{"ack":false,"self":false},"presence":{"key":"","enabled":false},"postgres_changes":[{"event":"INSERT","schema":"public","table":"messages"}],"private":false}}]"#;
    ws.send(Message::text(join))
        .await
        .map_err(|e| BenchError::new("ws send", e))?;
    let reply = next_text(&mut ws, |t| {
        t.contains("Subscribed to PostgreSQL") || t.contains("\"error\"")
    })
    .await?;
    if !reply.contains("Subscribed to PostgreSQL") {
        return Err(BenchError(format!("join failed: {reply}")));
    }
    Ok(ws)
}

/// A subscriber with a 4 KiB receive buffer, for the caller to never read again.
pub(super) async fn stalled_subscriber(url: &str, i: usize, token: &str) -> Result<Socket, BenchError> {
    subscribe(connect_with_buffer(url, i, Some(4096)).await?, token).await
}

async fn subscribe(mut ws: Socket, token: &str) -> Result<Socket, BenchError> {
    let login = format!(
        r#"{{"ref":1,"method":"create","service":"authentication","data":{{"strategy":"jwt","accessToken":"{token}"}}}}"#
    );
    let subscribe = r#"{"ref":2,"method":"subscribe","service":"messages","kinds":["created"]}"#.to_owned();
    request(&mut ws, &[login, subscribe]).await?;
    Ok(ws)
}

/// What one receiver saw.
#[derive(Default)]
pub(super) struct Received {
    pub(super) events: u64,
    pub(super) latencies: Vec<Duration>,
    /// The stamp of each event in `latencies`, in the same order.
    pub(super) stamps: Vec<u64>,
}

/// Reads events until `stop` and then until the stream has been idle for a second (at
/// most 30 s more), so a backlog still in flight is counted, not lost. Keeps latencies only
/// when `timed` (to bound memory).
pub(super) async fn receive(mut ws: Socket, timed: bool, stop: CancellationToken) -> Received {
    let mut got = Received::default();
    let mut deadline: Option<Instant> = None;
    loop {
        let frame = match deadline {
            None => tokio::select! {
                _ = stop.cancelled() => {
                    deadline = Some(Instant::now() + Duration::from_secs(30));
                    continue;
                }
                frame = ws.next() => frame,
            },
            Some(deadline) if Instant::now() >= deadline => break,
            Some(_) => match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
                Ok(frame) => frame,
                Err(_) => break,
            },
        };
        match frame {
            Some(Ok(Message::Text(t))) => {
                // A `/ws` event, a Supabase `postgres_changes` frame, or a socket.io event.
                if t.starts_with("{\"event\"")
                    || t.contains("\"postgres_changes\",{\"ids\"")
                    || t.starts_with("42[\"messages created\"")
                {
                    got.events += 1;
                    if timed && let Some((sent, age)) = age(&t) {
                        got.latencies.push(age);
                        got.stamps.push(sent);
                    }
                }
            }
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    got
}
