//! socketioxide's in-process adapter, plus a handle to it: the one public way to hand a
//! socket an already-encoded payload. Each event's payload is encoded once per view and
//! shared by every socket that receives it; socketioxide's own `emit` would serialize it
//! again for every socket. What each socket still costs is socketioxide's packet framing
//! (a copy of the payload behind its packet type) and Engine.IO's.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use socketioxide::adapter::Emitter;
use socketioxide_core::adapter::errors::SocketError;
use socketioxide_core::adapter::{BroadcastOptions, CoreAdapter, CoreLocalAdapter, DefinedAdapter, SocketEmitter};
use socketioxide_core::packet::Packet;
use socketioxide_core::{Sid, Str, Value};

/// Where the namespace's adapter can be reached once socketioxide has made it.
#[derive(Clone, Default)]
pub(in crate::transport) struct AdapterHandle(Arc<OnceLock<Weak<FeathersAdapter>>>);

/// Why a packet was not queued for a socket.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SendFailure {
    /// The socket's buffer is full: the client is not reading.
    Full,
    /// The socket or the namespace is gone.
    Closed,
}

impl AdapterHandle {
    /// Queues `["<event>", data]`, already encoded as `payload`, for one socket of the `/`
    /// namespace.
    pub(super) fn send(&self, sid: Sid, payload: &Str) -> Result<(), SendFailure> {
        let adapter = self.0.get().and_then(Weak::upgrade).ok_or(SendFailure::Closed)?;
        let packet = Packet::event("/", Value::Str(payload.clone(), None));
        adapter
            .local
            .broadcast(packet, BroadcastOptions::new(sid))
            .map_err(|errors| match errors.first() {
                Some(SocketError::InternalChannelFull) => SendFailure::Full,
                _ => SendFailure::Closed,
            })
    }
}

/// socketioxide's `LocalAdapter`, which registers itself with an [`AdapterHandle`].
pub(in crate::transport) struct FeathersAdapter {
    local: CoreLocalAdapter<Emitter>,
    handle: AdapterHandle,
}

impl CoreAdapter<Emitter> for FeathersAdapter {
    type Error = Infallible;
    type State = AdapterHandle;
    type AckStream = <Emitter as SocketEmitter>::AckStream;
    type InitRes = ();

    fn new(handle: &AdapterHandle, local: CoreLocalAdapter<Emitter>) -> Self {
        Self {
            local,
            handle: handle.clone(),
        }
    }

    /// Runs once the namespace holds the adapter: from now on the handle reaches it.
    fn init(self: Arc<Self>, on_success: impl FnOnce() + Send + 'static) {
        let _ = self.handle.0.set(Arc::downgrade(&self));
        on_success();
    }

    async fn broadcast_with_ack(
        &self,
        packet: Packet,
        opts: BroadcastOptions,
        timeout: Option<Duration>,
    ) -> Result<Self::AckStream, Infallible> {
        Ok(self.local.broadcast_with_ack(packet, opts, timeout).0)
    }

    fn get_local(&self) -> &CoreLocalAdapter<Emitter> {
        &self.local
    }
}

impl DefinedAdapter for FeathersAdapter {}
