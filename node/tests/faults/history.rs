//! The recorded history of one run: every client operation with its invocation and completion
//! times (monotonic, nanoseconds since the run began) and outcome, plus the fault schedule.
//! A failing run writes it as JSON lines under `target/fault-histories/` to be read or replayed.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Request {
    /// A linearizable read.
    Read,
    /// A `?stale=true` read of the member's local copy.
    StaleRead,
    /// An unconditional write of a value never written before.
    Write { value: u64 },
    /// A write conditioned on `If-Match: "expect_revision"`, which a read saw holding `expect_value`.
    Cas {
        expect_value: u64,
        expect_revision: u64,
        value: u64,
    },
}

/// How it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A read answered: the value (none = absent) and its mod revision (0 when absent).
    Read { value: Option<u64>, revision: u64 },
    /// A write or CAS applied at `revision`.
    Written { revision: u64 },
    /// A CAS refused with 412: nothing changed; the key was at `current_revision` (none = absent).
    CasFailed { current_revision: Option<u64> },
    /// Definitely not applied (refused before it reached Raft, or a read that failed).
    Fail { reason: String },
    /// May or may not have been applied (timeout, 504, connection lost after sending).
    Unknown { reason: String },
}

/// One operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    pub id: usize,
    pub client: usize,
    /// Index of the member the request went to.
    pub member: usize,
    pub key: String,
    pub request: Request,
    pub invoke_ns: u64,
    /// When the answer arrived; none for an unknown outcome (it may take effect any time later).
    pub complete_ns: Option<u64>,
    pub outcome: Outcome,
}

/// One line of the fault schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultEvent {
    pub at_ns: u64,
    pub event: String,
}

/// Shared recorder for every client of a run.
#[derive(Clone)]
pub struct Recorder {
    pub start: Instant,
    inner: Arc<Mutex<Recorded>>,
}

#[derive(Default)]
struct Recorded {
    ops: Vec<Op>,
    events: Vec<FaultEvent>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            start: Instant::now(),
            inner: Arc::default(),
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Records a finished operation; `invoke_ns` was taken before the request was sent.
    pub fn record(&self, client: usize, member: usize, key: &str, request: Request, invoke_ns: u64, outcome: Outcome) {
        let complete_ns = (!matches!(outcome, Outcome::Unknown { .. })).then(|| self.now_ns());
        let mut inner = self.inner.lock();
        let id = inner.ops.len();
        inner.ops.push(Op {
            id,
            client,
            member,
            key: key.to_string(),
            request,
            invoke_ns,
            complete_ns,
            outcome,
        });
    }

    /// Operations recorded so far.
    pub fn len(&self) -> usize {
        self.inner.lock().ops.len()
    }

    /// Whether `client`'s last operation recorded after position `since` failed.
    pub fn failed_since(&self, client: usize, since: usize) -> bool {
        let inner = self.inner.lock();
        inner.ops[since.min(inner.ops.len())..]
            .iter()
            .rev()
            .find(|op| op.client == client)
            .is_some_and(|op| matches!(op.outcome, Outcome::Fail { .. }))
    }

    pub fn event(&self, event: impl Into<String>) {
        let at_ns = self.now_ns();
        self.inner.lock().events.push(FaultEvent {
            at_ns,
            event: event.into(),
        });
    }

    pub fn ops(&self) -> Vec<Op> {
        self.inner.lock().ops.clone()
    }

    pub fn events(&self) -> Vec<FaultEvent> {
        self.inner.lock().events.clone()
    }

    /// Writes `{"run":...}`, then every fault event, then every operation, one JSON object a
    /// line, to `target/fault-histories/<name>.jsonl`.
    pub fn write(&self, name: &str, run: serde_json::Value) -> std::io::Result<PathBuf> {
        let dir = histories_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.jsonl"));
        let mut text = serde_json::json!({ "run": run }).to_string();
        text.push('\n');
        for e in self.events() {
            text.push_str(&serde_json::json!({ "fault": e }).to_string());
            text.push('\n');
        }
        for op in self.ops() {
            text.push_str(&serde_json::to_string(&op).expect("an op serializes"));
            text.push('\n');
        }
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// `target/fault-histories`, next to the tests' scratch directory.
pub fn histories_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent()
        .map_or(tmp.clone(), |p| p.to_path_buf())
        .join("fault-histories")
}

/// Reads a history file back (for replaying a failing run through the checker).
pub fn read(path: &std::path::Path) -> anyhow::Result<Vec<Op>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("{\"id\""))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}
