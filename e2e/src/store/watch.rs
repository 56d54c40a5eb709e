//! Watch history: the event types, the bounded history of changes every write appends to, and
//! where a watch starts (synthetic `ADDED` events, or a replay after a resourceVersion, with
//! `410 Gone` once that version has left the history).

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::broadcast;

use super::{Inner, Store};
use crate::error::ApiError;
use crate::resources::ResourceDef;

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// The object was created (or, for a selector-filtered watch, started to match).
    Added,
    /// The object changed.
    Modified,
    /// The object was removed.
    Deleted,
}

impl EventType {
    /// The wire name (`ADDED`, `MODIFIED`, `DELETED`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as recorded in the history and broadcast to watchers.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// The cluster resourceVersion this change produced.
    pub rv: u64,
    /// [`ResourceDef::storage_key`] of the object.
    pub storage_key: String,
    /// Namespace of the object, empty for cluster-scoped objects.
    pub namespace: String,
    /// What happened.
    pub event_type: EventType,
    /// The object after the change (for deletions, its last state).
    pub object: Value,
    /// The object before a modification, so selector-filtered watches can tell when it stopped matching.
    pub previous: Option<Value>,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStart {
    /// Synthetic `ADDED` events for every current object, then live changes
    /// (resourceVersion unset or `"0"`, or `sendInitialEvents=true`).
    Now,
    /// Every change after this resourceVersion.
    After(u64),
}

/// A watch, ready to stream.
pub struct WatchStream {
    /// Events to send first: synthetic `ADDED` events or replayed history.
    pub initial: Vec<Arc<WatchEvent>>,
    /// Live events; only those with `rv` above [`WatchStream::start_rv`] are new.
    pub live: broadcast::Receiver<Arc<WatchEvent>>,
    /// The cluster resourceVersion when the watch started.
    pub start_rv: u64,
}

impl Store {
    /// A receiver of every future change, for in-process controllers.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<WatchEvent>> {
        self.events.subscribe()
    }

    /// Drops the whole watch history, so any watch from an older resourceVersion gets `410 Gone`.
    pub fn compact(&self) {
        let mut inner = self.inner.lock();
        inner.history.clear();
        inner.compacted_rv = inner.rv;
    }

    /// Starts a watch on one resource (`ns` = `None` for all namespaces).
    pub fn watch(&self, res: &ResourceDef, ns: Option<&str>, start: WatchStart) -> Result<WatchStream, ApiError> {
        let inner = self.inner.lock();
        let storage = res.storage_key();
        let live = self.events.subscribe();
        let initial = match start {
            WatchStart::Now => inner
                .in_storage(&storage)
                .filter(|((_, n, _), _)| ns.is_none_or(|ns| ns == n))
                .map(|((_, n, _), o)| {
                    Arc::new(WatchEvent {
                        rv: inner.rv,
                        storage_key: storage.clone(),
                        namespace: n.clone(),
                        event_type: EventType::Added,
                        object: o.clone(),
                        previous: None,
                    })
                })
                .collect(),
            WatchStart::After(rv) => {
                if rv < inner.compacted_rv {
                    return Err(ApiError::gone(rv, inner.compacted_rv));
                }
                inner
                    .history
                    .iter()
                    .filter(|e| e.rv > rv && e.storage_key == storage)
                    .filter(|e| ns.is_none_or(|ns| ns == e.namespace))
                    .cloned()
                    .collect()
            }
        };
        Ok(WatchStream {
            initial,
            live,
            start_rv: inner.rv,
        })
    }
}

impl Inner {
    pub(super) fn record(&mut self, events: &broadcast::Sender<Arc<WatchEvent>>, event: WatchEvent) {
        let event = Arc::new(event);
        self.history.push_back(event.clone());
        while self.history.len() > self.history_capacity {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted_rv = dropped.rv;
            }
        }
        tracing::trace!(rv = event.rv, storage = %event.storage_key, kind = event.event_type.as_str(), "store event");
        let _ = events.send(event);
    }
}
