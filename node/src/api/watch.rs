//! `GET /v1/watch`: a stream of newline-delimited JSON [`WatchEvent`]s over one chunked
//! response (the same over h2c), built on a [`Watcher`].
//!
//! The watch starts after a read barrier, so a watch opened after a write was acknowledged sees
//! it on any member: replayed when `start_revision` is at or below it, or counted in the
//! position the stream starts from. A `start_revision` that is no longer retained answers `410`
//! before any event; a stream whose position is compacted later ends with an `error` event
//! carrying `compact_revision`. The stream ends with an `error` event on shutdown too, so a
//! client tells an ending from a dropped connection.
//!
//! The stream is polled by the connection only as fast as the client reads: a slow client holds
//! at most one page of changes here and never slows apply (see [`crate::watch`]).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use raftkv_api::{codes, WatchChange, WatchEnd, WatchEvent, WatchProgress};
use serde::Deserialize;
use tokio::time::Instant;

use super::error::{ApiError, ApiResult};
use super::kv::text_or_base64;
use super::request::{ClientQuery, KeyParams};
use super::{ApiState, MAX_KEY_LEN};
use crate::history::Change;
use crate::watch::{Filter, Next, Watcher};

/// The watch's typed parameters; what it follows is `prefix=` (empty for every key) or `key=`,
/// read as [`KeyParams`].
#[derive(Deserialize)]
pub(super) struct WatchParams {
    /// Replay every change from this revision on first; absent or 0: start after the current
    /// revision.
    start_revision: Option<u64>,
    /// Add each change's previous value.
    #[serde(default)]
    prev_value: bool,
    /// Send a progress event as soon as the replay is done.
    #[serde(default)]
    progress_notify: bool,
}

fn filter_of(keys: &KeyParams) -> ApiResult<Filter> {
    match (keys.get("prefix"), keys.get("key")) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            codes::INVALID_QUERY,
            "give either prefix= or key=, not both",
        )),
        (None, None) => Err(ApiError::bad_request(
            codes::INVALID_QUERY,
            "give prefix= (empty for every key) or key=",
        )),
        (Some(p), None) if p.len() > MAX_KEY_LEN => Err(ApiError::bad_request(
            codes::INVALID_KEY,
            format!("the prefix is longer than {MAX_KEY_LEN} bytes"),
        )),
        (Some(p), None) => Ok(Filter::Prefix(p)),
        (None, Some(k)) if k.is_empty() || k.len() > MAX_KEY_LEN => Err(ApiError::bad_request(
            codes::INVALID_KEY,
            format!("the key is {} bytes; keys are 1 to {MAX_KEY_LEN} bytes", k.len()),
        )),
        (None, Some(k)) => Ok(Filter::Key(k)),
    }
}

pub(super) async fn watch(
    State(s): State<ApiState>,
    ClientQuery(q): ClientQuery<WatchParams>,
    keys: KeyParams,
) -> ApiResult {
    let filter = filter_of(&keys)?;
    s.ensure_member()?;
    // Linearizable start: everything committed before this call is applied here first.
    s.read_barrier().await?;
    let start = q.start_revision.filter(|r| *r > 0);
    let watcher = Watcher::open(s.shared.clone(), filter, start).map_err(ApiError::compacted)?;
    let start_position = watcher.position();
    tracing::debug!(start = start_position + 1, "watch opened");
    let stream = WatchStream {
        progress_at: Instant::now() + s.limits.watch_progress,
        announce: q.progress_notify,
        prev_value: q.prev_value,
        watcher,
        ended: false,
        _open: OpenWatch::new(&s),
        s,
    };
    let body = futures::stream::unfold(stream, |mut st| async move {
        let chunk = st.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), st))
    });
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Where the stream starts: every change after this revision is sent. A watch without
    // `start_revision` learns here what "now" was, so it can resume without a gap even before
    // its first event or progress.
    h.insert("x-raftkv-revision", HeaderValue::from(start_position));
    Ok(resp)
}

/// Counts an open watch in the metrics for as long as its stream lives.
struct OpenWatch(ApiState);

impl OpenWatch {
    fn new(s: &ApiState) -> Self {
        s.metrics.watchers.inc();
        OpenWatch(s.clone())
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.metrics.watchers.dec();
    }
}

/// One stream's state between two chunks.
struct WatchStream {
    s: ApiState,
    watcher: Watcher,
    /// When to send a progress event if nothing else was sent.
    progress_at: Instant,
    /// A progress event is due once the replay is done (`progress_notify`).
    announce: bool,
    prev_value: bool,
    /// The final event was sent.
    ended: bool,
    _open: OpenWatch,
}

impl WatchStream {
    /// The next chunk of lines, `None` once the final event was sent.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        loop {
            let next = tokio::select! {
                // Shutdown first: a stream with changes always pending would otherwise never end.
                biased;
                _ = self.s.shutdown.cancelled() => {
                    let message = "the member is shutting down; resume on another member".to_string();
                    return Some(self.end(codes::SHUTTING_DOWN, message, None));
                }
                next = self.watcher.next() => next,
                _ = tokio::time::sleep_until(self.progress_at) => return Some(self.progress()),
            };
            return match next {
                Next::Changes(changes) => {
                    self.progress_at = Instant::now() + self.s.limits.watch_progress;
                    self.s.metrics.watch_events.inc_by(changes.len() as u64);
                    let mut out = BytesMut::with_capacity(changes.len() * 96);
                    for c in &changes {
                        push_line(&mut out, &event_of(c, self.prev_value));
                    }
                    Some(out.freeze())
                }
                Next::CaughtUp if self.announce => {
                    self.announce = false;
                    Some(self.progress())
                }
                Next::CaughtUp => continue,
                Next::Compacted(c) => {
                    self.s.metrics.watch_compacted.inc();
                    tracing::info!(
                        position = self.watcher.position(),
                        compact_revision = c.compact_revision,
                        "watch ended: its position was compacted"
                    );
                    Some(self.end(codes::COMPACTED, c.to_string(), Some(c.compact_revision)))
                }
            };
        }
    }

    fn progress(&mut self) -> Bytes {
        self.progress_at = Instant::now() + self.s.limits.watch_progress;
        let mut out = BytesMut::with_capacity(48);
        push_line(
            &mut out,
            &WatchEvent::Progress(WatchProgress {
                revision: self.watcher.position(),
            }),
        );
        out.freeze()
    }

    fn end(&mut self, code: &str, message: String, compact_revision: Option<u64>) -> Bytes {
        self.ended = true;
        let mut out = BytesMut::with_capacity(160);
        push_line(
            &mut out,
            &WatchEvent::Error(WatchEnd {
                error: code.to_string(),
                message,
                revision: self.watcher.position(),
                compact_revision,
            }),
        );
        out.freeze()
    }
}

fn push_line(out: &mut BytesMut, event: &WatchEvent) {
    let mut w = out.writer();
    // Serializing these plain structs into memory cannot fail.
    serde_json::to_writer(&mut w, event).expect("a watch event serializes");
    w.into_inner().put_u8(b'\n');
}

/// The wire form of one change.
pub(crate) fn event_of(c: &Change, prev_value: bool) -> WatchEvent {
    let (key, key_base64) = text_or_base64(&c.key);
    let (prev_value, prev_value_base64) = match (&c.before, prev_value) {
        (Some(before), true) => text_or_base64(&before.value),
        _ => (None, None),
    };
    match &c.after {
        Some(after) => {
            let (value, value_base64) = text_or_base64(&after.value);
            WatchEvent::Put(WatchChange {
                key,
                key_base64,
                value,
                value_base64,
                revision: c.revision,
                create_revision: Some(after.create_revision),
                prev_value,
                prev_value_base64,
            })
        }
        None => WatchEvent::Delete(WatchChange {
            key,
            key_base64,
            value: None,
            value_base64: None,
            revision: c.revision,
            create_revision: None,
            prev_value,
            prev_value_base64,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvValue;

    #[test]
    fn changes_become_put_and_delete_events_with_binary_as_base64() {
        let before = KvValue {
            value: Bytes::from_static(b"\xff"),
            create_revision: 2,
            mod_revision: 3,
        };
        let put = Change {
            revision: 5,
            key: Bytes::from_static(b"g/a"),
            after: Some(KvValue {
                value: Bytes::from_static(b"new"),
                create_revision: 2,
                mod_revision: 5,
            }),
            before: Some(before.clone()),
        };
        let line = serde_json::to_value(event_of(&put, true)).unwrap();
        assert_eq!(
            line,
            serde_json::json!({"type": "put", "key": "g/a", "value": "new", "revision": 5,
                "create_revision": 2, "prev_value_base64": "/w=="})
        );
        let without_prev = serde_json::to_value(event_of(&put, false)).unwrap();
        assert!(without_prev.get("prev_value_base64").is_none());
        let delete = Change {
            revision: 6,
            key: Bytes::from_static(b"\xffk"),
            after: None,
            before: Some(before),
        };
        assert_eq!(
            serde_json::to_value(event_of(&delete, false)).unwrap(),
            serde_json::json!({"type": "delete", "key_base64": "/2s=", "revision": 6})
        );
    }

    #[test]
    fn a_watch_names_a_prefix_or_a_key_but_not_both() {
        let q = |query: &str| KeyParams::parse(query).unwrap();
        assert_eq!(filter_of(&q("prefix=")).unwrap(), Filter::Prefix(Bytes::new()));
        assert_eq!(filter_of(&q("key=k")).unwrap(), Filter::Key(Bytes::from_static(b"k")));
        assert_eq!(
            filter_of(&q("prefix=%ff")).unwrap(),
            Filter::Prefix(Bytes::from_static(b"\xff"))
        );
        assert!(filter_of(&q("")).is_err());
        assert!(filter_of(&q("prefix=a&key=b")).is_err());
        assert!(filter_of(&q("key=")).is_err());
    }
}
