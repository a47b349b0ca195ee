//! The outbound pipeline: change source → service events (stripped) → hub.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::change::{Change, ChangeError, ChangeSource};
use crate::event::{EventKind, Position, ServiceEvent};
use crate::hub::{Cutoff, Hub};
use crate::metrics::Metrics;
use crate::service::{Service, Services};

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Delivers every change the source yields until `shutdown`. A read error is retried with
/// backoff; the source keeps its position, so nothing is lost or repeated.
pub async fn deliver<S: ChangeSource>(
    mut source: S,
    services: Arc<Services>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    slow_consumer_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut behind = false;
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            batch = source.next_batch() => batch,
        };
        match batch {
            Ok(changes) => {
                backoff = Duration::from_millis(100);
                metrics.reader_up.set(1);
                metrics.changes_read.inc_by(changes.len() as u64);
                for change in &changes {
                    publish(change, &services, &hub);
                }
                // Healthy clients set the pace; the change log is the buffer, not memory.
                hub.flush(slow_consumer_timeout).await;
                hub.end_ticks_through(source.read_through());
                if let Some(last) = changes.last() {
                    metrics.delivered_tick.set(last.tick);
                }
                // Once, when it starts: those who resume here meanwhile may stay.
                if source.too_far_behind() && !behind {
                    hub.cut_off_subscribers(
                        Cutoff::SlowConsumer,
                        "this instance fell behind the cluster: resume with since on another",
                    );
                }
                behind = source.too_far_behind();
            }
            Err(ChangeError::Gap { after_tick }) => {
                // Nobody can be told exactly what they missed: every subscriber reloads.
                tracing::error!(after_tick, "the change source skipped changes: events were lost");
                metrics.change_log_gaps.inc();
                metrics.last_gap_unix.set(unix_now());
                hub.cut_off_subscribers(Cutoff::Reload, "events were lost: reload, then subscribe again");
                // Resumes read what live delivery skipped from the log.
                hub.begin_tick(source.read_through());
                hub.end_ticks_through(source.read_through());
            }
            Err(e) => {
                metrics.reader_up.set(0);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "reading the change log failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn publish(change: &Change, services: &Services, hub: &Hub) {
    hub.begin_tick(change.tick);
    for service in services.for_table(&change.table_schema, &change.table_name) {
        // A change to a user moves that user's connections first, so that, say, a demoted
        // admin gets no admin-only event from here on.
        if let Some(auth) = services.auth()
            && auth.is_users_service(&service.name)
        {
            apply_user_change(auth, change, hub);
        }
        if change.kind != EventKind::Truncated {
            services.check_row_shape(service, &change.row);
        }
        let event = event_for(change, service);
        hub.publish(&mut service.policy.prepare(&event).on_table(service.table()));
    }
}

/// Live authorization: `connection.user` follows the users table, whoever wrote it.
fn apply_user_change(auth: &Authenticator, change: &Change, hub: &Hub) {
    if change.kind == EventKind::Truncated {
        auth.forget_everyone();
        hub.logout_everyone("user removed");
        return;
    }
    let Some(id) = auth.user_id_of(&change.row) else {
        return;
    };
    auth.forget_user(&id);
    match change.kind {
        EventKind::Removed => hub.logout_user(&id, "user removed"),
        _ => {
            if let Some(principal) = auth.principal_from_row(&change.row, None) {
                hub.update_user(&id, principal.role, principal.user);
            }
        }
    }
}

/// The event a service makes of a change: hidden fields stripped. Live delivery and resume
/// both build events here.
pub fn event_for(change: &Change, service: &Service) -> ServiceEvent {
    let mut data = change.row.clone();
    service.strip(&mut data);
    let old = change.old.clone().map(|mut old| {
        service.strip(&mut old);
        old
    });
    ServiceEvent {
        service: service.name.clone(),
        kind: change.kind,
        data,
        old,
        position: Position {
            tick: change.tick,
            seq: change.seq,
        },
        written_us: change.written_us,
    }
}
