//! Who receives an event and what they see, in the spirit of Feathers' `service.publish`
//! and `channel.filter((data, connection) => …)`.
//!
//! A service's [`Policy`] names the channels an event goes to ([`Publisher`]), lets custom
//! [`EventFilter`]s veto single connections, and hides fields per reader ([`Visibility`]).
//! The config rules are one `Publisher` among others: Rust code embedding quill can
//! register its own (see `gateway::Extensions`).

mod change_record;
mod template;
mod visibility;

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde_json::Value;

pub use template::TemplatePublisher;
pub use visibility::Visibility;

use crate::auth::Principal;
use crate::event::{ChangeRecord, EventKind, RenderedEvent, ServiceEvent};
use crate::service::query::Query;
use crate::store::Table;

/// Everyone connected.
pub const ANONYMOUS: &str = "anonymous";
/// Every logged-in connection.
pub const AUTHENTICATED: &str = "authenticated";

/// The channel of one user's connections.
pub fn user_channel(id: &str) -> String {
    format!("users/{id}")
}

/// The channel of every connection whose user has this role.
pub fn role_channel(role: &str) -> String {
    format!("roles/{role}")
}

/// Names the channels an event is published to (Feathers' `service.publish`).
pub trait Publisher: Send + Sync {
    fn channels(&self, event: &ServiceEvent) -> Vec<String>;

    /// The channels that any row's events could go to: an event without a row (a
    /// truncate) goes to their members. By default every channel; code publishers that
    /// keep rows from some connections should say which.
    fn reach(&self) -> Vec<ChannelPattern> {
        vec![ChannelPattern::Prefix(String::new())]
    }
}

/// A channel name, or every channel whose name starts with a prefix (`users/` for the
/// template `users/{user_id}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelPattern {
    Exact(String),
    Prefix(String),
}

impl ChannelPattern {
    pub fn matches(&self, channel: &str) -> bool {
        match self {
            ChannelPattern::Exact(name) => channel == name,
            ChannelPattern::Prefix(prefix) => channel.starts_with(prefix.as_str()),
        }
    }
}

impl<F> Publisher for F
where
    F: Fn(&ServiceEvent) -> Vec<String> + Send + Sync,
{
    fn channels(&self, event: &ServiceEvent) -> Vec<String> {
        self(event)
    }
}

/// Decides per connection whether it gets an event it would otherwise receive
/// (Feathers' `channel.filter((data, connection) => …)`). `user` is `connection.user`.
pub trait EventFilter: Send + Sync {
    fn allows(&self, event: &ServiceEvent, user: Option<&Principal>) -> bool;
}

impl<F> EventFilter for F
where
    F: Fn(&ServiceEvent, Option<&Principal>) -> bool + Send + Sync,
{
    fn allows(&self, event: &ServiceEvent, user: Option<&Principal>) -> bool {
        self(event, user)
    }
}

/// Runs code an embedder supplied. A panic there must not end event delivery for
/// everyone: it is logged and the event goes nowhere (publisher) or is withheld (filter).
fn guarded<T>(what: &str, fallback: T, f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(value) => value,
        Err(_) => {
            tracing::error!(what, "custom code panicked; the event is withheld");
            fallback
        }
    }
}

/// How one service's events reach connections.
#[derive(Clone)]
pub struct Policy {
    pub publisher: Arc<dyn Publisher>,
    pub filters: Vec<Arc<dyn EventFilter>>,
    pub visibility: Visibility,
    /// The service's id column: a row that leaves a subscriber's scope is announced by id.
    pub id_column: Arc<str>,
}

impl Policy {
    /// Computes the channels once; the result is shared by every receiver.
    pub fn prepare<'a>(&'a self, event: &'a ServiceEvent) -> Prepared<'a> {
        let channels = guarded("publisher", Vec::new(), || self.publisher.channels(event));
        // Where the row was: an update with its old row may leave some channels.
        let before = event.old.as_ref().map(|old| ServiceEvent {
            service: event.service.clone(),
            kind: event.kind,
            data: old.clone(),
            old: None,
            position: event.position,
            written_us: event.written_us,
        });
        let old_channels = before
            .as_ref()
            .map(|before| guarded("publisher", Vec::new(), || self.publisher.channels(before)));
        Prepared {
            channels,
            old_channels,
            before,
            reach: if event.kind == EventKind::Truncated {
                guarded("publisher", Vec::new(), || self.publisher.reach())
            } else {
                Vec::new()
            },
            policy: self,
            event,
            frames: Vec::new(),
            moved_in: Vec::new(),
            moved_out: None,
            table: None,
            records: Vec::new(),
        }
    }
}

/// The views of a Supabase-style record: of the row, and of the old row (`None`: its id only).
type RecordViews = (u64, Option<u64>);

/// An event on its way out: its channels and its rendered views.
pub struct Prepared<'a> {
    pub channels: Vec<String>,
    /// For an update with its old row: the channels the row was in before.
    pub old_channels: Option<Vec<String>>,
    /// For an update with its old row: the event as it would have been before it.
    before: Option<ServiceEvent>,
    /// For an event without a row: the channels any row could reach.
    pub reach: Vec<ChannelPattern>,
    pub event: &'a ServiceEvent,
    policy: &'a Policy,
    /// One rendering per distinct view, built on first use.
    frames: Vec<(u64, Arc<RenderedEvent>)>,
    /// The same, marked `"moved": "in"` (the row entered the subscriber's scope).
    moved_in: Vec<(u64, Arc<RenderedEvent>)>,
    /// The `removed` frame, id only, for subscribers whose scope the row left.
    moved_out: Option<Arc<RenderedEvent>>,
    /// The service's table, for Supabase-style records (their schema, table and columns).
    table: Option<Arc<Table>>,
    /// One Supabase-style record per distinct view (of the row, and of the old row when
    /// the reader may have it), built on first use.
    records: Vec<(RecordViews, Option<Arc<ChangeRecord>>)>,
}

impl Prepared<'_> {
    /// Names the service's table, so that Supabase-style records can be rendered.
    pub fn on_table(mut self, table: Arc<Table>) -> Self {
        self.table = Some(table);
        self
    }

    /// The view a reader has of the row as it was before an update, if it may have that
    /// row at all (its channels held it then and the event filters allowed it): `None`
    /// otherwise, or when the event has no old row.
    pub fn old_view_for(&self, user: Option<&Principal>, was_reached: bool) -> Option<u64> {
        let before = self.before.as_ref()?;
        (was_reached && self.allowed_before(user)).then(|| self.policy.visibility.view(user, &before.data))
    }

    /// The event as a Supabase `postgres_changes` record: the row in `view`, and for an
    /// update the old row in `old_view`, or only its id when the reader may not have the
    /// old row (as Supabase sends under RLS). Rendered once per pair of views; `None` for a
    /// truncate or without a table.
    pub fn record(&mut self, view: u64, old_view: Option<u64>) -> Option<Arc<ChangeRecord>> {
        let key = (view, old_view);
        if let Some((_, record)) = self.records.iter().find(|(k, _)| *k == key) {
            return record.clone();
        }
        let table = self.table.clone()?;
        let visibility = &self.policy.visibility;
        let in_view = |row: &Value, view: u64| {
            let mut row = row.clone();
            if !visibility.is_full(view) {
                visibility.apply(&mut row, view);
            }
            row
        };
        let row = in_view(&self.event.data, view);
        let id_column = &*self.policy.id_column;
        let old = self.event.old.as_ref().map(|old| match old_view {
            Some(old_view) => in_view(old, old_view),
            None => serde_json::json!({ id_column: old.get(id_column).cloned().unwrap_or(Value::Null) }),
        });
        let record = change_record::render(self.event, &table, &row, old.as_ref());
        self.records.push((key, record.clone()));
        record
    }

    /// Whether `user` sees every column `query` filters or sorts on in every row.
    pub fn may_filter_on(&self, user: Option<&Principal>, query: &Query) -> bool {
        query
            .filter_columns()
            .all(|c| self.policy.visibility.sees_everywhere(user, c))
    }

    /// Whether the event filters let `user` have the row as it was before the update (no
    /// old row: whether they let it have this one).
    pub fn allowed_before(&self, user: Option<&Principal>) -> bool {
        let event = self.before.as_ref().unwrap_or(self.event);
        self.policy
            .filters
            .iter()
            .all(|f| guarded("event filter", false, || f.allows(event, user)))
    }

    /// The view this connection gets, or `None` if a filter withholds the event.
    pub fn view_for(&self, user: Option<&Principal>) -> Option<u64> {
        if self
            .policy
            .filters
            .iter()
            .all(|f| guarded("event filter", false, || f.allows(self.event, user)))
        {
            Some(self.policy.visibility.view(user, &self.event.data))
        } else {
            None
        }
    }

    /// The event rendered for a view: serialized once per distinct view, shared by all.
    pub fn frame(&mut self, view: u64) -> Arc<RenderedEvent> {
        self.rendered(view, None)
    }

    /// The event's row as a reader with this view sees it.
    pub fn row_in_view(&self, view: u64) -> Value {
        let mut data = self.event.data.clone();
        if !self.policy.visibility.is_full(view) {
            self.policy.visibility.apply(&mut data, view);
        }
        data
    }

    /// The event for a subscriber whose scope the row just entered: the full row (for its
    /// view), marked `"moved": "in"`.
    pub fn moved_in_frame(&mut self, view: u64) -> Arc<RenderedEvent> {
        self.rendered(view, Some("in"))
    }

    /// For a subscriber whose scope the row just left: `removed` with the id only, marked
    /// `"moved": "out"`. Never the new values.
    pub fn moved_out_frame(&mut self) -> Arc<RenderedEvent> {
        if let Some(frame) = &self.moved_out {
            return frame.clone();
        }
        let id_column = &*self.policy.id_column;
        let id = self
            .event
            .old
            .as_ref()
            .and_then(|old| old.get(id_column))
            .or_else(|| self.event.data.get(id_column))
            .cloned()
            .unwrap_or(Value::Null);
        let removed = ServiceEvent {
            kind: EventKind::Removed,
            data: serde_json::json!({ id_column: id }),
            old: None,
            ..self.event.clone()
        };
        let frame = render(&removed, &removed.data, Some("out"));
        self.moved_out = Some(frame.clone());
        frame
    }

    fn rendered(&mut self, view: u64, moved: Option<&str>) -> Arc<RenderedEvent> {
        let cache = if moved.is_some() { &self.moved_in } else { &self.frames };
        if let Some((_, frame)) = cache.iter().find(|(v, _)| *v == view) {
            return frame.clone();
        }
        let frame = if self.policy.visibility.is_full(view) {
            render(self.event, &self.event.data, moved)
        } else {
            let mut data = self.event.data.clone();
            self.policy.visibility.apply(&mut data, view);
            render(self.event, &data, moved)
        };
        let cache = if moved.is_some() {
            &mut self.moved_in
        } else {
            &mut self.frames
        };
        cache.push((view, frame.clone()));
        frame
    }
}

/// Serializes the data once and builds the `/ws` frame around those bytes.
fn render(event: &ServiceEvent, data: &Value, moved: Option<&str>) -> Arc<RenderedEvent> {
    // Serializing a Value into a Vec cannot fail.
    let data = serde_json::to_vec(data).unwrap_or_default();
    let mut ws = Vec::with_capacity(data.len() + event.service.len() + 64);
    ws.extend_from_slice(b"{\"event\":\"");
    ws.extend_from_slice(event.kind.as_str().as_bytes());
    ws.extend_from_slice(b"\",\"service\":");
    // Service names are letters, digits, '_' and '-': no escaping needed, but stay exact.
    ws.extend_from_slice(&serde_json::to_vec(&*event.service).unwrap_or_default());
    if event.kind != EventKind::Truncated {
        ws.extend_from_slice(b",\"data\":");
        ws.extend_from_slice(&data);
    }
    ws.extend_from_slice(b",\"seq\":");
    ws.extend_from_slice(event.position.seq.to_string().as_bytes());
    if let Some(moved) = moved {
        ws.extend_from_slice(b",\"moved\":\"");
        ws.extend_from_slice(moved.as_bytes());
        ws.push(b'"');
    }
    ws.push(b'}');
    Arc::new(RenderedEvent {
        service: event.service.clone(),
        kind: event.kind,
        seq: event.position.seq,
        data: Bytes::from(data),
        ws: Bytes::from(ws),
        socketio: OnceLock::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;
    use serde_json::json;

    #[test]
    fn a_panicking_custom_filter_or_publisher_withholds_the_event_instead_of_crashing() {
        let event = ServiceEvent {
            service: Arc::from("messages"),
            kind: EventKind::Created,
            data: json!({"id": 1}),
            old: None,
            position: Position { tick: 1, seq: 1 },
            written_us: None,
        };
        let panicking_filter = |_: &ServiceEvent, _: Option<&Principal>| -> bool { panic!("bug in user code") };
        let policy = Policy {
            publisher: Arc::new(|_: &ServiceEvent| -> Vec<String> { panic!("bug in user code") }),
            filters: vec![Arc::new(panicking_filter)],
            visibility: Visibility::default(),
            id_column: Arc::from("id"),
        };
        let prepared = policy.prepare(&event);
        assert!(prepared.channels.is_empty());
        assert_eq!(prepared.view_for(None), None);
    }

    #[test]
    fn the_ws_frame_is_the_event_as_json() {
        let event = ServiceEvent {
            service: Arc::from("messages"),
            kind: EventKind::Patched,
            data: json!({"id": 1, "text": "a \"quote\""}),
            old: None,
            position: Position { tick: 3, seq: 42 },
            written_us: None,
        };
        let frame = render(&event, &event.data, None);
        let parsed: Value = serde_json::from_slice(&frame.ws).expect("valid JSON");
        assert_eq!(
            parsed,
            json!({"event": "patched", "service": "messages", "data": event.data, "seq": 42})
        );
    }
}
