//! Contexts for ReadIndex requests: what makes a linearizable read safe to answer.
//!
//! raft-rs's leader confirms a read by broadcasting a heartbeat carrying the read's context and
//! counting the followers that echo it; once a quorum did, that request and every request queued
//! before it are answered with the commit index recorded when each was queued. The leader keys all
//! of this by the context bytes alone, so a context must name exactly one request, once. If a
//! context were sent twice (a retry after the first round got no answer), an acknowledgement of
//! its first round, delayed while the leader was paused and deposed, would confirm the second
//! round and, with it, any read queued after leadership had passed to another member: a stale read.
//! Contexts are therefore a random per-process nonce followed by a counter, and a retry takes a
//! new one.

/// Hands out read-index contexts, none of them ever handed out before by any member.
#[derive(Debug)]
pub struct ReadContexts {
    /// Random per process: keeps this member's contexts apart from every other member's and from
    /// its own previous runs.
    nonce: u64,
    /// The next counter value.
    next: u64,
}

impl ReadContexts {
    /// Contexts under a fresh random nonce.
    pub fn new() -> Self {
        Self::with_nonce(rand::random())
    }

    fn with_nonce(nonce: u64) -> Self {
        ReadContexts { nonce, next: 1 }
    }

    /// A context never handed out before.
    pub fn next_context(&mut self) -> Vec<u8> {
        let mut ctx = Vec::with_capacity(16);
        ctx.extend_from_slice(&self.nonce.to_le_bytes());
        ctx.extend_from_slice(&self.next.to_le_bytes());
        self.next += 1;
        ctx
    }
}

impl Default for ReadContexts {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use raft::prelude::{Message, MessageType};
    use raft::storage::MemStorage;
    use raft::{Config, RawNode, ReadOnlyOption, StateRole};

    use super::*;

    /// Three in-memory members whose messages the test delivers, holds or drops one by one.
    struct Net {
        nodes: HashMap<u64, RawNode<MemStorage>>,
        /// Read states each member's Ready handed out, as (context, index).
        reads: HashMap<u64, Vec<(Vec<u8>, u64)>>,
    }

    impl Net {
        fn new() -> Net {
            let logger = crate::consensus::raft_logger(0);
            let nodes = (1..=3)
                .map(|id| {
                    let config = Config {
                        id,
                        election_tick: 10,
                        heartbeat_tick: 1,
                        check_quorum: true,
                        pre_vote: true,
                        read_only_option: ReadOnlyOption::Safe,
                        ..Config::default()
                    };
                    let storage = MemStorage::new_with_conf_state((vec![1, 2, 3], vec![]));
                    (id, RawNode::new(&config, storage, &logger).expect("raw node"))
                })
                .collect();
            Net {
                nodes,
                reads: HashMap::new(),
            }
        }

        /// Runs one member's Ready: persists, collects read states, returns outgoing messages.
        fn ready(&mut self, id: u64) -> Vec<Message> {
            let node = self.nodes.get_mut(&id).expect("member");
            if !node.has_ready() {
                return Vec::new();
            }
            let mut ready = node.ready();
            let mut out = ready.take_messages();
            for rs in ready.take_read_states() {
                self.reads.entry(id).or_default().push((rs.request_ctx, rs.index));
            }
            let store = node.store().clone();
            store.wl().append(ready.entries()).expect("append");
            if let Some(hs) = ready.hs() {
                store.wl().set_hardstate(hs.clone());
            }
            out.extend(ready.take_persisted_messages());
            let mut light = node.advance(ready);
            if let Some(commit) = light.commit_index() {
                store.wl().mut_hard_state().commit = commit;
            }
            out.extend(light.take_messages());
            node.advance_apply();
            out
        }

        /// Delivers messages, and whatever they cause, until none is left, dropping those to or
        /// from a member in `cut`.
        fn deliver(&mut self, mut queue: Vec<Message>, cut: &[u64]) {
            for id in 1..=3 {
                queue.extend(self.ready(id));
            }
            while !queue.is_empty() {
                for m in std::mem::take(&mut queue) {
                    if cut.contains(&m.to) || cut.contains(&m.from) {
                        continue;
                    }
                    let to = m.to;
                    let _ = self.nodes.get_mut(&to).expect("member").step(m);
                    queue.extend(self.ready(to));
                }
            }
        }

        fn node(&mut self, id: u64) -> &mut RawNode<MemStorage> {
            self.nodes.get_mut(&id).expect("member")
        }

        fn read_index(&mut self, id: u64, ctx: Vec<u8>) -> Vec<Message> {
            self.node(id).read_index(ctx);
            self.ready(id)
        }
    }

    /// Replays how a paused and deposed leader could answer a read from its stale state: member
    /// 3's read `first` is queued on leader 1, whose heartbeat acknowledgements are held (1 is
    /// paused); 3 asks again with `retry`; 2 and 3 elect a new leader and commit more; 1 resumes,
    /// queues a read of its own, and only then receives the held messages. 3's acknowledgement
    /// answers `first`; were `retry` the same context, 3's retry would queue it again behind 1's
    /// own read, and 2's late acknowledgement of the first round would then confirm both.
    /// Returns 1's read states, the new leader's commit index, and the context of 1's own read.
    fn paused_leader_after_a_retry(first: Vec<u8>, retry: Vec<u8>) -> Resumed {
        let mut net = Net::new();
        net.node(1).campaign().expect("campaign");
        net.deliver(Vec::new(), &[]);
        assert_eq!(net.node(1).raft.state, StateRole::Leader);

        // Member 3's read reaches leader 1, which sends heartbeats carrying its context.
        let to_leader = net.read_index(3, first);
        assert_eq!(to_leader.len(), 1, "the read is forwarded to the leader");
        net.node(1).step(to_leader[0].clone()).expect("step");
        let heartbeats = net.ready(1);
        let mut held = Vec::new();
        for hb in heartbeats
            .into_iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgHeartbeat)
        {
            let to = hb.to;
            net.node(to).step(hb).expect("step");
            held.extend(net.ready(to));
        }
        // Member 1 is paused: the acknowledgements wait in its socket, and so does member 3's
        // retry, sent before 3 learns of a new leader.
        held.extend(net.read_index(3, retry));
        assert!(held.iter().any(|m| m.get_msg_type() == MessageType::MsgReadIndex));
        assert!(
            held.iter()
                .filter(|m| m.get_msg_type() == MessageType::MsgHeartbeatResponse)
                .count()
                == 2
        );

        // 2 and 3 stop hearing from 1, elect one of them and commit a write 1 never sees.
        let mut leader = None;
        for _ in 0..100 {
            net.node(2).tick();
            net.node(3).tick();
            net.deliver(Vec::new(), &[1]);
            leader = [2, 3]
                .into_iter()
                .find(|&id| net.node(id).raft.state == StateRole::Leader);
            if leader.is_some() {
                break;
            }
        }
        let leader = leader.expect("2 and 3 elect a new leader");
        net.node(leader).propose(vec![], b"write".to_vec()).expect("propose");
        net.deliver(Vec::new(), &[1]);
        let new_commit = net.node(leader).raft.raft_log.committed;

        // 1 resumes, still believing it leads term 1: it queues a read of its own, then reads
        // what was held. Each peer's stream keeps its order, but nothing orders two streams:
        // here 3's (its acknowledgement, then its retry) comes before 2's acknowledgement.
        assert_eq!(net.node(1).raft.state, StateRole::Leader);
        let own = b"own-read".to_vec();
        net.node(1).read_index(own.clone());
        let _ = net.ready(1);
        held.sort_by_key(|m| std::cmp::Reverse(m.from));
        for m in held {
            if m.to == 1 {
                let _ = net.node(1).step(m);
                let _ = net.ready(1);
            }
        }
        Resumed {
            reads: net.reads.remove(&1).unwrap_or_default(),
            new_commit,
            own,
        }
    }

    /// What the resumed leader did.
    struct Resumed {
        /// Its read states, as (context, index).
        reads: Vec<(Vec<u8>, u64)>,
        /// The new leader's commit index.
        new_commit: u64,
        /// The context of its own read.
        own: Vec<u8>,
    }

    #[test]
    fn a_context_sent_twice_lets_a_deposed_leader_confirm_a_read_it_may_not_answer() {
        // The hazard itself: with the same context on the retry, the held acknowledgements
        // confirm member 1's own read, at an index below what the new leader committed.
        let ctx = b"same".to_vec();
        let Resumed { reads, new_commit, own } = paused_leader_after_a_retry(ctx.clone(), ctx);
        let stale = reads.iter().find(|(ctx, _)| *ctx == own);
        assert!(
            stale.is_some_and(|(_, index)| *index < new_commit),
            "expected raft-rs to confirm the deposed leader's read: {reads:?}"
        );
    }

    #[test]
    fn fresh_contexts_for_retries_leave_a_deposed_leader_without_a_read_to_answer() {
        let mut contexts = ReadContexts::new();
        let Resumed { reads, own, .. } = paused_leader_after_a_retry(contexts.next_context(), contexts.next_context());
        assert!(
            reads.iter().all(|(ctx, _)| *ctx != own),
            "the deposed leader confirmed its own read: {reads:?}"
        );
    }

    #[test]
    fn contexts_never_repeat_within_a_process_or_across_members() {
        let mut a = ReadContexts::with_nonce(7);
        let mut b = ReadContexts::with_nonce(8);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(a.next_context()));
            assert!(seen.insert(b.next_context()));
        }
    }
}
