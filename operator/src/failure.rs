//! Why a node stopped, as the operator reads it from its pod: the fatal line a node writes to
//! its termination message (`raftkv-node: fatal [code key=value ...]: ...`, the node's
//! `Error::code`), and the container's failure around it.

/// What a node said when it stopped, parsed from the tag of its fatal line
/// (`raftkv-node: fatal [code key=value ...]: ...`, see the node's `Error::code`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FatalCode {
    /// The volume holds member `member` of cluster `cluster`, which was removed from it.
    RemovedMember {
        /// The removed member's id.
        member: u64,
        /// The cluster it was removed from.
        cluster: u64,
    },
    /// The write-ahead log on the volume is damaged.
    WalDamaged,
    /// A snapshot on the volume is damaged.
    SnapshotDamaged,
    /// Another fatal error, by its code.
    Other(String),
}

impl FatalCode {
    /// The code in a termination message, when the message is a node's fatal line.
    pub fn parse(message: &str) -> Option<Self> {
        let tag = message.split_once("fatal [")?.1.split_once(']')?.0;
        let mut words = tag.split_whitespace();
        let code = words.next()?;
        let field = |name: &str| -> Option<u64> {
            tag.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))?
                .parse()
                .ok()
        };
        Some(match code {
            "removed_member" => FatalCode::RemovedMember {
                member: field("member")?,
                cluster: field("cluster")?,
            },
            "wal_damaged" => FatalCode::WalDamaged,
            "snapshot_damaged" => FatalCode::SnapshotDamaged,
            other => FatalCode::Other(other.to_string()),
        })
    }
}

/// Why a pod's node is not running, from its container's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFailure {
    /// The node's fatal line (the termination message), or the container's waiting reason and
    /// message when it left none.
    pub message: String,
    /// The fatal line's code, when the message is one.
    pub code: Option<FatalCode>,
    /// How often the container has been restarted.
    pub restarts: u32,
}
