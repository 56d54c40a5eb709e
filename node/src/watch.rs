//! Watches: the change feed the state machine publishes after every applied batch, and the
//! [`Watcher`] that turns the retained history plus that feed into one gap-free, duplicate-free
//! sequence of changes for a key or prefix, from any retained revision on.
//!
//! A watcher has a cursor: every change below it was delivered (or did not match). It reads the
//! history page by page up to the applied index ("catching up"), then follows the feed ("live").
//! The feed is a `tokio::sync::broadcast` ring shared by every watcher: publishing never waits
//! for a watcher, so a slow one cannot slow apply, and costs no memory per watcher. A watcher
//! that falls behind the ring (it was not polled: its client reads slowly) notices it
//! (`Lagged`) and catches up from the history again; one that falls behind the history too is
//! ended with [`Next::Compacted`]. So a watcher holds at most one page of changes, and is ended
//! only when what it still needs is gone: the history's bounds are the bound of every watcher.
//!
//! No gap and no duplicate between replay and live: before each read of the history the watcher
//! subscribes to the feed, so every batch applied after that read reaches it through the feed,
//! and every batch applied before it is in what it read; batches seen both ways are told apart
//! by the cursor (a change below it was already delivered).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::history::{Change, Compacted};
use crate::state_machine::Shared;

/// Batches the feed holds before a watcher that has not read them must catch up from the
/// history instead.
pub const FEED_CAPACITY: usize = 512;
/// A batch whose changes cost more than this (see [`Change::cost`]) is published without them
/// (`complete: false`): watchers read it from the history. The ring keeps its last
/// [`FEED_CAPACITY`] batches alive whoever reads them, so this bounds the memory it holds beyond
/// the history's own bounds to 32 MiB. A batch of 64 writes of 256-byte values fits.
pub const MAX_FEED_BATCH_BYTES: usize = 64 << 10;
/// Most changes one catch-up read takes out of the history (and so holds per watcher).
pub const PAGE_CHANGES: usize = 512;

/// What the state machine publishes after applying a batch (or installing a snapshot).
#[derive(Debug, Clone)]
pub struct AppliedBatch {
    /// The applied index before the batch.
    pub from: u64,
    /// The applied index after it.
    pub applied: u64,
    /// The changes the batch made, ascending.
    pub changes: Vec<Change>,
    /// False when the changes are not all here: some were compacted within the batch, or the
    /// state was replaced by a snapshot. A watcher then reads the history instead.
    pub complete: bool,
}

/// The change feed: one sender in the shared state, one receiver per live watcher.
pub type Feed = broadcast::Sender<Arc<AppliedBatch>>;

/// Which keys a watch follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// Every key that starts with these bytes (all keys when empty).
    Prefix(Bytes),
    /// Exactly this key.
    Key(Bytes),
}

impl Filter {
    /// Whether `key` is followed.
    pub fn matches(&self, key: &[u8]) -> bool {
        match self {
            Filter::Prefix(p) => key.starts_with(p),
            Filter::Key(k) => key == k.as_ref(),
        }
    }
}

/// What [`Watcher::next`] yields.
#[derive(Debug)]
pub enum Next {
    /// The next matching changes, ascending, none seen before.
    Changes(Vec<Change>),
    /// The replay is done: from here on changes come as they are applied. Yielded once.
    CaughtUp,
    /// The watcher's position is no longer in the history: it cannot go on.
    Compacted(Compacted),
}

/// One watch's position in the change feed.
pub struct Watcher {
    shared: Arc<Shared>,
    filter: Filter,
    /// Every change below this revision was delivered or did not match.
    cursor: u64,
    /// Following the feed; `None` while catching up from the history.
    live: Option<broadcast::Receiver<Arc<AppliedBatch>>>,
    /// [`Next::CaughtUp`] was yielded.
    announced: bool,
}

impl Watcher {
    /// A watcher from revision `start` on (every change at or above it), or, without one, from
    /// the change after the current applied index. Refuses a start whose changes may have been
    /// compacted away.
    pub fn open(shared: Arc<Shared>, filter: Filter, start: Option<u64>) -> Result<Watcher, Compacted> {
        let cursor = {
            let state = shared.state.read();
            match start {
                Some(start) => {
                    state.history.check_retained(start)?;
                    start
                }
                None => state.applied_index + 1,
            }
        };
        Ok(Watcher {
            shared,
            filter,
            cursor,
            live: None,
            announced: false,
        })
    }

    /// Every change up to and including this revision was delivered (or did not match): the
    /// revision to report in a progress event and to resume after.
    pub fn position(&self) -> u64 {
        self.cursor - 1
    }

    /// Waits for the next matching changes. Cancel-safe: the only await is the feed's `recv`,
    /// and the cursor moves only once a batch is in hand.
    pub async fn next(&mut self) -> Next {
        loop {
            if self.live.is_some() && !self.announced {
                self.announced = true;
                return Next::CaughtUp;
            }
            let Some(live) = &mut self.live else {
                match self.catch_up() {
                    Ok(changes) if changes.is_empty() => continue,
                    Ok(changes) => return Next::Changes(changes),
                    Err(compacted) => return Next::Compacted(compacted),
                }
            };
            let batch = match live.recv().await {
                Ok(batch) => batch,
                // Behind the ring (not polled for a while): read the history instead.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.live = None;
                    continue;
                }
                // The sender lives in `Shared`, which this watcher holds: never closed. Read the
                // history if it ever is.
                Err(broadcast::error::RecvError::Closed) => {
                    self.live = None;
                    continue;
                }
            };
            if batch.applied < self.cursor {
                // Already covered by the history read this watcher subscribed before.
                continue;
            }
            if !batch.complete || batch.from >= self.cursor {
                // Some changes at or above the cursor are not in this batch (compacted within it,
                // a snapshot installed, or a gap): the history has them, or says they are gone.
                self.live = None;
                continue;
            }
            let changes: Vec<Change> = batch
                .changes
                .iter()
                .filter(|c| c.revision >= self.cursor && self.filter.matches(&c.key))
                .cloned()
                .collect();
            self.cursor = batch.applied + 1;
            if !changes.is_empty() {
                return Next::Changes(changes);
            }
        }
    }

    /// One page of the history from the cursor on. Subscribes first, so that once the page
    /// reaches the applied index the feed carries on exactly where it ends.
    fn catch_up(&mut self) -> Result<Vec<Change>, Compacted> {
        let feed = self.shared.feed.subscribe();
        let (page, applied) = {
            let state = self.shared.state.read();
            let page = state.history.read(
                self.cursor,
                state.applied_index,
                |k| self.filter.matches(k),
                PAGE_CHANGES,
            )?;
            (page, state.applied_index)
        };
        self.cursor = self.cursor.max(page.through + 1);
        if page.through >= applied {
            self.live = Some(feed);
        }
        Ok(page.changes)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::command::{self, Op, Precondition, Proposal};
    use crate::history::HistoryLimits;
    use crate::kv::KvState;
    use crate::metrics::Metrics;
    use crate::state_machine::{ApplyMsg, Committed, StateMachine};

    fn entry(index: u64, key: &str, value: &str) -> Committed {
        let op = if value.is_empty() {
            Op::Delete {
                key: Bytes::copy_from_slice(key.as_bytes()),
                precondition: Precondition::None,
            }
        } else {
            Op::Put {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: Bytes::copy_from_slice(value.as_bytes()),
                precondition: Precondition::None,
            }
        };
        Committed::Normal {
            index,
            term: 1,
            data: command::encode(&Proposal { request_id: 0, op }).into(),
        }
    }

    /// Drives a state machine task, returning the sender of its apply channel.
    fn start(
        limits: HistoryLimits,
    ) -> (
        Arc<Shared>,
        tokio::sync::mpsc::UnboundedSender<ApplyMsg>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut state = KvState::default();
        state.history.set_limits(limits);
        let shared = Shared::new(state);
        let (inbox, _rx) = flume::unbounded();
        std::mem::forget(_rx);
        let sm = StateMachine {
            shared: shared.clone(),
            snapshots: crate::snapshot::SnapshotStore::open(dir.path()).unwrap(),
            snapshot_count: u64::MAX,
            raft_inbox: inbox,
            metrics: Arc::new(Metrics::new()),
            history_limits: limits,
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(sm.run(rx));
        (shared, tx, dir)
    }

    async fn collect(w: &mut Watcher, upto: u64) -> Result<Vec<(u64, String)>, Compacted> {
        let mut out = Vec::new();
        while w.position() < upto {
            match tokio::time::timeout(Duration::from_secs(10), w.next())
                .await
                .expect("events in time")
            {
                Next::Changes(cs) => out.extend(
                    cs.into_iter()
                        .map(|c| (c.revision, String::from_utf8(c.key.to_vec()).unwrap())),
                ),
                Next::CaughtUp => {}
                Next::Compacted(c) => return Err(c),
            }
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_watcher_replays_then_follows_live_without_gap_or_duplicate() {
        let (shared, tx, _dir) = start(HistoryLimits::default());
        tx.send(ApplyMsg::Entries(
            (1..=5).map(|i| entry(i, &format!("a/{i}"), "v")).collect(),
        ))
        .unwrap();
        let mut applied = shared.applied.subscribe();
        applied.wait_for(|a| *a >= 5).await.unwrap();
        let mut w = Watcher::open(shared.clone(), Filter::Prefix(Bytes::from_static(b"a/")), Some(3)).unwrap();
        // Batches applied while the watcher replays, and others under another prefix.
        for i in 6..=40u64 {
            let key = if i.is_multiple_of(3) {
                format!("b/{i}")
            } else {
                format!("a/{i}")
            };
            tx.send(ApplyMsg::Entries(vec![entry(i, &key, "v")])).unwrap();
        }
        let got = collect(&mut w, 40).await.unwrap();
        let expected: Vec<_> = (3..=40u64)
            .filter(|i| *i <= 5 || !i.is_multiple_of(3))
            .map(|i| (i, format!("a/{i}")))
            .collect();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_the_feed_catches_up_from_the_history() {
        let (shared, tx, _dir) = start(HistoryLimits::default());
        let mut w = Watcher::open(shared.clone(), Filter::Key(Bytes::from_static(b"k")), None).unwrap();
        // Enter live mode on an empty history first.
        tx.send(ApplyMsg::Entries(vec![entry(1, "k", "v")])).unwrap();
        assert_eq!(collect(&mut w, 1).await.unwrap(), vec![(1, "k".to_string())]);
        // More batches than the feed holds, none read meanwhile.
        let n = FEED_CAPACITY as u64 + 100;
        for i in 2..=n {
            tx.send(ApplyMsg::Entries(vec![entry(
                i,
                if i.is_multiple_of(2) { "k" } else { "j" },
                "v",
            )]))
            .unwrap();
        }
        shared.applied.subscribe().wait_for(|a| *a >= n).await.unwrap();
        let got = collect(&mut w, n).await.unwrap();
        let expected: Vec<_> = (2..=n)
            .filter(|i| i.is_multiple_of(2))
            .map(|i| (i, "k".to_string()))
            .collect();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn a_watcher_whose_position_was_compacted_is_ended_with_the_compact_revision() {
        let limits = HistoryLimits {
            max_changes: 10,
            max_bytes: usize::MAX,
        };
        let (shared, tx, _dir) = start(limits);
        tx.send(ApplyMsg::Entries((1..=20).map(|i| entry(i, "k", "v")).collect()))
            .unwrap();
        shared.applied.subscribe().wait_for(|a| *a >= 20).await.unwrap();
        let refused = Watcher::open(shared.clone(), Filter::Prefix(Bytes::new()), Some(10)).err();
        assert_eq!(
            refused,
            Some(Compacted {
                asked: 10,
                compact_revision: 10
            })
        );
        // A watcher at 11 that does not read while 20 more changes are applied.
        let mut w = Watcher::open(shared.clone(), Filter::Prefix(Bytes::new()), Some(11)).unwrap();
        tx.send(ApplyMsg::Entries((21..=40).map(|i| entry(i, "k", "v")).collect()))
            .unwrap();
        shared.applied.subscribe().wait_for(|a| *a >= 40).await.unwrap();
        match w.next().await {
            Next::Compacted(c) => assert_eq!(c.compact_revision, 30),
            other => panic!("got {other:?} from a compacted position"),
        }
    }

    #[tokio::test]
    async fn a_watcher_from_a_future_revision_sees_changes_from_there_on() {
        let (shared, tx, _dir) = start(HistoryLimits::default());
        let mut w = Watcher::open(shared.clone(), Filter::Prefix(Bytes::new()), Some(8)).unwrap();
        for i in 1..=12u64 {
            tx.send(ApplyMsg::Entries(vec![entry(i, "k", if i == 9 { "" } else { "v" })]))
                .unwrap();
        }
        let got = collect(&mut w, 12).await.unwrap();
        assert_eq!(got.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![8, 9, 10, 11, 12]);
    }

    #[tokio::test]
    async fn batches_too_large_for_the_feed_reach_live_watchers_through_the_history() {
        let (shared, tx, _dir) = start(HistoryLimits::default());
        let mut w = Watcher::open(shared.clone(), Filter::Prefix(Bytes::new()), None).unwrap();
        assert!(matches!(w.next().await, Next::CaughtUp));
        let big = "x".repeat(MAX_FEED_BATCH_BYTES);
        for i in 1..=6u64 {
            let value = if i % 2 == 0 { big.as_str() } else { "small" };
            tx.send(ApplyMsg::Entries(vec![entry(i, &format!("k{i}"), value)]))
                .unwrap();
        }
        let got = collect(&mut w, 6).await.unwrap();
        assert_eq!(got.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    }
}
