use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::channel::{Policy, TemplatePublisher, Visibility};
use crate::event::{EventKind, Position, ServiceEvent};
use crate::service::access::Rule;

fn event(seq: i64) -> ServiceEvent {
    ServiceEvent {
        service: Arc::from("messages"),
        kind: EventKind::Created,
        data: json!({"id": seq, "user_id": 1, "secret": "s"}),
        old: None,
        position: Position { tick: seq, seq },
        written_us: None,
    }
}

fn policy(channels: &[&str]) -> Policy {
    let templates: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
    Policy {
        publisher: Arc::new(TemplatePublisher::parse(&templates).expect("templates")),
        filters: Vec::new(),
        visibility: Visibility::default(),
        id_column: Arc::from("id"),
    }
}

fn publish(hub: &Hub, policy: &Policy, event: &ServiceEvent) {
    hub.publish(&mut policy.prepare(event));
}

fn user(id: &str, role: Option<&str>) -> Principal {
    Principal {
        id: id.into(),
        role: role.map(Into::into),
        user: json!({"id": id}),
        expires_at: None,
    }
}

fn data_of(frame: Frame) -> Value {
    match frame {
        Frame::Event(e) => serde_json::from_slice(&e.data).expect("json"),
        other => panic!("not an event: {other:?}"),
    }
}

fn all() -> Subscription {
    Subscription::new(KindSet::ALL, None)
}

#[tokio::test]
async fn a_connection_that_stays_full_is_cut_off_at_flush_and_others_keep_everything() {
    let hub = Hub::new();
    let p = policy(&["anonymous"]);
    let mut fast = hub.join(2);
    let slow = hub.join(2);
    hub.subscribe(fast.id, Arc::from("messages"), all());
    hub.subscribe(slow.id, Arc::from("messages"), all());
    for seq in 0..5 {
        publish(&hub, &p, &event(seq));
    }
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        for _ in 0..5 {
            let frame = fast.frames.recv().await.expect("fast gets every event");
            seqs.push(data_of(frame)["id"].as_i64().expect("id"));
        }
        (fast, seqs)
    });
    hub.flush(Duration::from_millis(200)).await;
    let (fast, seqs) = reader.await.expect("reader");
    assert_eq!(seqs, [0, 1, 2, 3, 4], "parked frames keep their order");
    assert_eq!(slow.kick.fired().await, (Cutoff::SlowConsumer, SLOW_CONSUMER));
    assert!(!fast.kick.token.is_cancelled());
}

#[tokio::test]
async fn a_connection_that_parks_again_after_a_flush_is_drained_by_the_next_one() {
    let hub = Hub::new();
    let p = policy(&["anonymous"]);
    let mut conn = hub.join(1);
    hub.subscribe(conn.id, Arc::from("messages"), all());
    for page in 0..3 {
        // The queue holds one frame: the second of each page is parked.
        publish(&hub, &p, &event(2 * page));
        publish(&hub, &p, &event(2 * page + 1));
        let reader = tokio::spawn(async move {
            let mut seqs = Vec::new();
            for _ in 0..2 {
                let frame = conn.frames.recv().await.expect("every event");
                seqs.push(data_of(frame)["id"].as_i64().expect("id"));
            }
            (conn, seqs)
        });
        hub.flush(Duration::from_millis(500)).await;
        let (back, seqs) = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the parked frame is drained")
            .expect("reader");
        assert_eq!(seqs, [2 * page, 2 * page + 1]);
        assert!(!back.kick.token.is_cancelled(), "page {page}");
        conn = back;
    }
}

fn at(tick: i64, seq: i64) -> ServiceEvent {
    ServiceEvent {
        position: Position { tick, seq },
        written_us: None,
        ..event(seq)
    }
}

#[tokio::test]
async fn a_replaying_subscription_drops_live_events_until_it_goes_live_after_its_tick() {
    let hub = Hub::new();
    let p = policy(&["anonymous"]);
    let mut m = hub.join(8);
    hub.begin_tick(5);
    let replay = hub.subscribe_replaying(m.id, Arc::from("messages"), all());
    publish(&hub, &p, &at(5, 51));
    assert!(m.frames.try_recv().is_err(), "the replay sends tick 5");
    // Tick 6 started while the replay read up to 5: not yet live.
    hub.begin_tick(6);
    publish(&hub, &p, &at(6, 60));
    assert_eq!(hub.go_live(m.id, "messages", replay, 5, false, None), HandOver::NotYet);
    assert_eq!(hub.go_live(m.id, "messages", replay, 6, false, None), HandOver::Live);
    // The rest of tick 6 is the replay's too; tick 7 is live.
    publish(&hub, &p, &at(6, 61));
    hub.begin_tick(7);
    publish(&hub, &p, &at(7, 70));
    let frame = m.frames.try_recv().expect("live after the hand-over");
    assert_eq!(data_of(frame)["id"], 70);
    assert!(m.frames.try_recv().is_err(), "nothing repeated");
}

#[tokio::test]
async fn a_last_pass_holds_later_live_events_and_queues_them_after_the_replay() {
    let hub = Hub::new();
    let p = policy(&["anonymous"]);
    let mut m = hub.join(8);
    hub.begin_tick(5);
    let replay = hub.subscribe_replaying(m.id, Arc::from("messages"), all());
    // The replay read up to 5; 6 started and is half published.
    hub.begin_tick(6);
    publish(&hub, &p, &at(6, 60));
    assert_eq!(
        hub.go_live(m.id, "messages", replay, 5, true, None),
        HandOver::ReadThrough(6)
    );
    publish(&hub, &p, &at(6, 61)); // the replay's: it reads through 6
    hub.begin_tick(7);
    publish(&hub, &p, &at(7, 70)); // held
    assert!(m.frames.try_recv().is_err(), "held while the replay reads");
    // The replay takes what was held and sends it; what arrives meanwhile is held too.
    let Released::More(held) = hub.release(m.id, "messages", replay) else {
        panic!("tick 7 was held");
    };
    publish(&hub, &p, &at(7, 71));
    for frame in held {
        m.replies.try_send(frame).expect("room");
    }
    let Released::More(held) = hub.release(m.id, "messages", replay) else {
        panic!("71 was held");
    };
    for frame in held {
        m.replies.try_send(frame).expect("room");
    }
    assert!(matches!(hub.release(m.id, "messages", replay), Released::Live));
    hub.begin_tick(8);
    publish(&hub, &p, &at(8, 80));
    let ids: Vec<Value> = std::iter::from_fn(|| m.frames.try_recv().ok())
        .map(|f| data_of(f)["id"].clone())
        .collect();
    assert_eq!(ids, [70, 71, 80], "held events first, then live, nothing repeated");
}

#[tokio::test]
async fn a_later_subscribe_supersedes_a_running_replay() {
    let hub = Hub::new();
    let p = policy(&["anonymous"]);
    let mut m = hub.join(8);
    let first = hub.subscribe_replaying(m.id, Arc::from("messages"), all());
    let second = hub.subscribe_replaying(m.id, Arc::from("messages"), all());
    let replayed = at(1, 10);
    let replay = |id| {
        let permit = m.replies.try_reserve().expect("room");
        hub.replay_event(m.id, id, &mut p.prepare(&replayed), permit)
    };
    assert!(matches!(replay(first), Replayed::Stop));
    assert!(matches!(replay(second), Replayed::Sent));
    assert_eq!(
        hub.go_live(m.id, "messages", first, 1, true, None),
        HandOver::Superseded
    );
    // A plain subscribe supersedes it too.
    hub.subscribe(m.id, Arc::from("messages"), all());
    assert!(matches!(replay(second), Replayed::Stop));
    assert!(matches!(hub.release(m.id, "messages", second), Released::Gone));
    publish(&hub, &p, &at(2, 20));
    let ids: Vec<Value> = std::iter::from_fn(|| m.frames.try_recv().ok())
        .map(|f| data_of(f)["id"].clone())
        .collect();
    assert_eq!(ids, [10, 20], "the second replay's event, then live");
}

#[tokio::test]
async fn a_connection_cut_off_gets_nothing_more_and_flush_does_not_wait_for_it() {
    let hub = Hub::new();
    let p = policy(&["anonymous"]);
    let mut stalled = hub.join(1);
    hub.subscribe(stalled.id, Arc::from("messages"), all());
    publish(&hub, &p, &event(1));
    publish(&hub, &p, &event(2)); // parked
    hub.kick(stalled.id, Cutoff::SlowConsumer, "cut off");
    // The flush would wait an hour for a connection that was not cut off.
    tokio::time::timeout(Duration::from_secs(5), hub.flush(Duration::from_secs(3600)))
        .await
        .expect("flush skips a connection that was cut off");
    publish(&hub, &p, &event(3));
    assert_eq!(data_of(stalled.frames.try_recv().expect("queued before"))["id"], 1);
    assert!(stalled.frames.try_recv().is_err(), "nothing after the cut-off");
}

#[tokio::test]
async fn kinds_and_queries_filter_and_drop_unsubscribes() {
    let hub = Hub::new();
    let p = policy(&["anonymous"]);
    let mut m = hub.join(4);
    hub.subscribe(
        m.id,
        Arc::from("messages"),
        Subscription::new(KindSet::of(&[EventKind::Removed]), None),
    );
    publish(&hub, &p, &event(1));
    assert!(m.frames.try_recv().is_err(), "created is not wanted");
    drop(m);
    assert_eq!(hub.connections(), 0);
    assert!(hub.read().by_service.is_empty() && hub.read().channels.is_empty());
}

#[tokio::test]
async fn events_reach_only_connections_in_their_channels_once() {
    let hub = Hub::new();
    let mut anonymous = hub.join(8);
    let mut alice = hub.join(8);
    let mut bob = hub.join(8);
    hub.login(alice.id, user("1", Some("admin")));
    hub.login(bob.id, user("2", None));
    for m in [&anonymous, &alice, &bob] {
        hub.subscribe(m.id, Arc::from("messages"), all());
    }
    // published to two channels alice is in: she gets it once
    publish(&hub, &policy(&["users/{user_id}", "roles/admin"]), &event(1));
    assert!(alice.frames.try_recv().is_ok());
    assert!(alice.frames.try_recv().is_err(), "once, not per channel");
    assert!(bob.frames.try_recv().is_err());
    assert!(anonymous.frames.try_recv().is_err());
    publish(&hub, &policy(&["authenticated"]), &event(2));
    assert!(alice.frames.try_recv().is_ok() && bob.frames.try_recv().is_ok());
    assert!(anonymous.frames.try_recv().is_err(), "anonymous is not authenticated");
    // demoted: the admin channel no longer reaches alice
    hub.update_user("1", None, json!({"id": "1"}));
    publish(&hub, &policy(&["roles/admin"]), &event(3));
    assert!(alice.frames.try_recv().is_err());
    // removed: logged out, told why, back to anonymous
    hub.logout_user("2", "user removed");
    assert!(matches!(
        bob.frames.try_recv(),
        Ok(Frame::Logout { reason: "user removed" })
    ));
    publish(&hub, &policy(&["anonymous"]), &event(4));
    assert!(bob.frames.try_recv().is_ok() && anonymous.frames.try_recv().is_ok());
}

#[tokio::test]
async fn restricted_fields_are_rendered_once_per_view() {
    let hub = Hub::new();
    let visibility = Visibility::new(vec![(
        "secret".into(),
        vec![Rule::Owner("user_id".into()), Rule::Role("admin".into())],
    )])
    .expect("visibility");
    let p = Policy {
        visibility,
        ..policy(&["authenticated"])
    };
    let mut owner = hub.join(4);
    let mut admin = hub.join(4);
    let mut other = hub.join(4);
    hub.login(owner.id, user("1", None));
    hub.login(admin.id, user("9", Some("admin")));
    hub.login(other.id, user("2", None));
    for m in [&owner, &admin, &other] {
        hub.subscribe(m.id, Arc::from("messages"), all());
    }
    publish(&hub, &p, &event(1));
    let (Ok(Frame::Event(a)), Ok(Frame::Event(b)), Ok(Frame::Event(c))) = (
        owner.frames.try_recv(),
        admin.frames.try_recv(),
        other.frames.try_recv(),
    ) else {
        panic!("everyone gets the event");
    };
    assert!(Arc::ptr_eq(&a, &b), "same view, same bytes");
    assert_eq!(
        serde_json::from_slice::<Value>(&c.data).expect("json"),
        json!({"id": 1, "user_id": 1})
    );
    assert_eq!(serde_json::from_slice::<Value>(&a.data).expect("json")["secret"], "s");
}

#[tokio::test]
async fn synced_at_the_hand_over_comes_after_the_replay_and_before_every_live_event() {
    let hub = Hub::new();
    let p = policy(&["anonymous"]);
    let mut m = hub.join(8);
    let tx = m.replies.clone();
    hub.begin_tick(5);
    let replay = hub.subscribe_replaying(m.id, Arc::from("messages"), all());
    let permit = tx.try_reserve().expect("room");
    let synced = Frame::Text(bytes::Bytes::from_static(b"synced"));
    assert_eq!(
        hub.go_live(m.id, "messages", replay, 5, false, Some((permit, synced))),
        HandOver::Live
    );
    hub.begin_tick(6);
    publish(&hub, &p, &at(6, 60));
    assert!(matches!(m.frames.try_recv(), Ok(Frame::Text(t)) if &t[..] == b"synced"));
    assert_eq!(data_of(m.frames.try_recv().expect("live")).get("id"), Some(&json!(60)));
}

#[tokio::test]
async fn a_delivery_mark_waits_for_the_tick_to_end_the_subscription_to_be_live_and_the_overflow_to_drain() {
    let hub = Hub::new();
    let p = policy(&["anonymous"]);
    let mut m = hub.join(1);
    let tx = m.replies.clone();
    let mark = || Frame::Text(bytes::Bytes::from_static(b"mark"));
    assert_eq!(
        hub.mark_delivered(m.id, "messages", 1, tx.try_reserve().expect("room"), mark()),
        Marked::NotSubscribed
    );
    let replay = hub.subscribe_replaying(m.id, Arc::from("messages"), all());
    hub.end_ticks_through(7);
    // Replaying: its events up to the mark may still be on their way.
    assert_eq!(
        hub.mark_delivered(m.id, "messages", 7, tx.try_reserve().expect("room"), mark()),
        Marked::NotYet
    );
    assert_eq!(hub.go_live(m.id, "messages", replay, 7, false, None), HandOver::Live);
    // Tick 8 is published (one frame queued, one parked) but has not ended.
    hub.begin_tick(8);
    publish(&hub, &p, &at(8, 80));
    publish(&hub, &p, &at(8, 81));
    assert_eq!(
        data_of(m.frames.try_recv().expect("queued")).get("id"),
        Some(&json!(80))
    );
    assert_eq!(
        hub.mark_delivered(m.id, "messages", 8, tx.try_reserve().expect("room"), mark()),
        Marked::NotYet,
        "tick 8 has not ended"
    );
    hub.end_ticks_through(8);
    assert_eq!(
        hub.mark_delivered(m.id, "messages", 8, tx.try_reserve().expect("room"), mark()),
        Marked::NotYet,
        "81 is still parked: the mark would overtake it"
    );
    hub.flush(Duration::from_secs(1)).await;
    assert_eq!(
        data_of(m.frames.try_recv().expect("flushed")).get("id"),
        Some(&json!(81))
    );
    assert_eq!(
        hub.mark_delivered(m.id, "messages", 8, tx.try_reserve().expect("room"), mark()),
        Marked::Sent
    );
    assert!(matches!(m.frames.try_recv(), Ok(Frame::Text(t)) if &t[..] == b"mark"));
    hub.unsubscribe(m.id, "messages");
    assert_eq!(
        hub.mark_delivered(m.id, "messages", 8, tx.try_reserve().expect("room"), mark()),
        Marked::NotSubscribed
    );
}
