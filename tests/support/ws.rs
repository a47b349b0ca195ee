//! A minimal `/ws` client: calls with refs, buffered events, bounded waits.
#![allow(unreachable_pub)]

use std::collections::VecDeque;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::WAIT;

pub struct Ws {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_ref: i64,
    events: VecDeque<Value>,
}

impl Ws {
    pub async fn connect(url: &str) -> Ws {
        let (socket, _) = tokio_tungstenite::connect_async(url).await.expect("ws connect");
        Ws {
            socket,
            next_ref: 1,
            events: VecDeque::new(),
        }
    }

    /// Wraps a socket opened elsewhere.
    pub fn from_stream(socket: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Ws {
        Ws {
            socket,
            next_ref: 1,
            events: VecDeque::new(),
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.socket.send(Message::text(text)).await.expect("ws send");
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.socket.send(Message::binary(bytes)).await.expect("ws send");
    }

    /// Sends `{ref, method, service, ..extra}` and returns the reply frame; events that
    /// arrive meanwhile are kept for `next_event`.
    pub async fn call(&mut self, method: &str, service: &str, extra: Value) -> Value {
        let reference = self.next_ref;
        self.next_ref += 1;
        let mut msg = json!({"ref": reference, "method": method, "service": service});
        if let (Some(obj), Value::Object(extra)) = (msg.as_object_mut(), extra) {
            obj.extend(extra);
        }
        self.send_text(&msg.to_string()).await;
        self.reply_to(json!(reference)).await
    }

    /// Waits for the reply with this `ref`.
    pub async fn reply_to(&mut self, reference: Value) -> Value {
        loop {
            let frame = self.next_frame().await;
            if frame.get("event").is_some() {
                self.events.push_back(frame);
            } else if frame["ref"] == reference {
                return frame;
            }
        }
    }

    /// `call` that expects success and returns `result`.
    pub async fn ok(&mut self, method: &str, service: &str, extra: Value) -> Value {
        let reply = self.call(method, service, extra).await;
        assert!(reply.get("error").is_none(), "{method} {service} failed: {reply}");
        reply["result"].clone()
    }

    /// Logs the socket in with a token (the jwt strategy).
    pub async fn login(&mut self, token: &str) -> Value {
        self.ok(
            "create",
            "authentication",
            json!({"data": {"strategy": "jwt", "accessToken": token}}),
        )
        .await
    }

    pub async fn subscribe(&mut self, service: &str) {
        let result = self.ok("subscribe", service, json!({})).await;
        assert_eq!(result, json!({"subscribed": service}));
    }

    pub async fn next_event(&mut self) -> Value {
        if let Some(e) = self.events.pop_front() {
            return e;
        }
        loop {
            let frame = self.next_frame().await;
            if frame.get("event").is_some() {
                return frame;
            }
        }
    }

    /// Collects exactly `n` events.
    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next_event().await);
        }
        out
    }

    /// Asserts that no event arrives within `quiet`.
    pub async fn expect_no_event(&mut self, quiet: Duration) {
        assert!(self.events.is_empty(), "unexpected event: {:?}", self.events.front());
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => return,
                // quill's keep-alive pings are not events
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(Some(Ok(Message::Text(t)))) => panic!("unexpected frame: {t}"),
                Ok(other) => panic!("unexpected socket state: {other:?}"),
            }
        }
    }

    /// The next text frame as JSON (panics on close or timeout).
    pub async fn next_frame(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("a frame within the wait limit")
                .expect("socket open")
                .expect("socket healthy");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).expect("frames are JSON"),
                Message::Close(frame) => panic!("socket closed: {frame:?}"),
                _ => {}
            }
        }
    }

    /// Waits for the server to close the socket and returns (code, reason).
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .expect("close within the wait limit");
            match msg {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (frame.code.into(), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) | None => return (1005, String::new()),
                Some(Err(e)) => return (1006, e.to_string()),
                Some(Ok(_)) => {}
            }
        }
    }
}
