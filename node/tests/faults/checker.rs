//! Checks a recorded history: linearizability of every key with the Wing & Gong / Lowe search as
//! porcupine implements it (a doubly linked list of call and return events, backtracking, and a
//! cache of (linearized set, state) pairs already explored), plus the checks a register model
//! cannot express: one revision per value, stale reads that never go backwards on a member.
//!
//! The model is a register whose values are unique per run (every write writes a fresh value), so
//! a value names the one write that produced it and a CAS on a revision is a CAS on the value a
//! read saw at that revision. An operation with an unknown outcome has no return event: it may
//! take effect at any point after its invocation, or never (linearized after everything else,
//! which no later observation can tell apart from never).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::history::{Op, Outcome, Request};

/// What one key's check found.
#[derive(Debug)]
pub enum Verdict {
    Linearizable,
    /// No order explains the history; `stuck_at` is the operation the deepest attempt could not
    /// get past.
    NotLinearizable {
        stuck_at: usize,
    },
    /// The search gave up after its step budget.
    Inconclusive,
}

type State = Option<u64>;

/// One operation as the model sees it.
#[derive(Debug, Clone)]
enum ModelOp {
    Read(State),
    Write(u64),
    Cas { from: u64, to: u64, certain: bool },
    CasFailed { from: u64, current: Option<State> },
}

fn step(state: State, op: &ModelOp) -> Option<State> {
    match op {
        ModelOp::Read(seen) => (*seen == state).then_some(state),
        ModelOp::Write(v) => Some(Some(*v)),
        ModelOp::Cas { from, to, certain } => {
            if state == Some(*from) {
                Some(Some(*to))
            } else if *certain {
                None
            } else {
                // An unknown CAS that found another value failed and changed nothing.
                Some(state)
            }
        }
        ModelOp::CasFailed { from, current } => {
            let consistent = current.is_none_or(|c| c == state);
            (state != Some(*from) && consistent).then_some(state)
        }
    }
}

/// The model operation of a history entry, or none when it has no effect to check (failed
/// requests, stale reads).
fn model_op(op: &Op, value_at: &HashMap<u64, u64>) -> Option<ModelOp> {
    match (&op.request, &op.outcome) {
        (Request::Read, Outcome::Read { value, .. }) => Some(ModelOp::Read(*value)),
        (Request::Write { value }, Outcome::Written { .. } | Outcome::Unknown { .. }) => Some(ModelOp::Write(*value)),
        (
            Request::Cas {
                expect_value, value, ..
            },
            Outcome::Written { .. },
        ) => Some(ModelOp::Cas {
            from: *expect_value,
            to: *value,
            certain: true,
        }),
        (
            Request::Cas {
                expect_value, value, ..
            },
            Outcome::Unknown { .. },
        ) => Some(ModelOp::Cas {
            from: *expect_value,
            to: *value,
            certain: false,
        }),
        (Request::Cas { expect_value, .. }, Outcome::CasFailed { current_revision }) => Some(ModelOp::CasFailed {
            from: *expect_value,
            current: match current_revision {
                None => Some(None),
                Some(rev) => value_at.get(rev).map(|v| Some(*v)),
            },
        }),
        _ => None,
    }
}

/// Linearizability of one key's operations, starting from an absent key.
pub fn check_key(ops: &[&Op], value_at: &HashMap<u64, u64>, budget: u64) -> Verdict {
    let entries: Vec<(&Op, ModelOp)> = ops
        .iter()
        .filter_map(|op| model_op(op, value_at).map(|m| (*op, m)))
        .collect();
    let n = entries.len();
    if n == 0 {
        return Verdict::Linearizable;
    }
    // Events: node 2i is op i's call, 2i+1 its return; node 2n is the list head.
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, (op, _)) in entries.iter().enumerate() {
        events.push((op.invoke_ns, true, 2 * i));
        events.push((op.complete_ns.unwrap_or(u64::MAX), false, 2 * i + 1));
    }
    // Calls before returns at equal times: the permissive reading of a tie.
    events.sort_by_key(|&(t, is_call, node)| (t, !is_call, node));
    const NIL: usize = usize::MAX;
    let head = 2 * n;
    let mut next = vec![NIL; 2 * n + 1];
    let mut prev = vec![NIL; 2 * n + 1];
    let mut last = head;
    for &(_, _, node) in &events {
        next[last] = node;
        prev[node] = last;
        last = node;
    }
    let lift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, call: usize| {
        for node in [call, call + 1] {
            let (p, nx) = (prev[node], next[node]);
            next[p] = nx;
            if nx != NIL {
                prev[nx] = p;
            }
        }
    };
    let unlift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, call: usize| {
        for node in [call + 1, call] {
            let (p, nx) = (prev[node], next[node]);
            next[p] = node;
            if nx != NIL {
                prev[nx] = node;
            }
        }
    };
    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state: State = None;
    let mut entry = next[head];
    let mut steps = 0u64;
    let (mut deepest, mut stuck_at) = (0usize, entries[0].0.id);
    while entry != NIL {
        steps += 1;
        if steps > budget {
            return Verdict::Inconclusive;
        }
        let i = entry / 2;
        if entry.is_multiple_of(2) {
            if let Some(new_state) = step(state, &entries[i].1) {
                linearized[i / 64] |= 1 << (i % 64);
                if cache.insert((linearized.clone(), new_state)) {
                    stack.push((entry, state));
                    state = new_state;
                    lift(&mut next, &mut prev, entry);
                    entry = next[head];
                    continue;
                }
                linearized[i / 64] &= !(1 << (i % 64));
            }
            entry = next[entry];
        } else {
            if stack.len() >= deepest {
                deepest = stack.len();
                stuck_at = entries[i].0.id;
            }
            let Some((call, previous)) = stack.pop() else {
                return Verdict::NotLinearizable { stuck_at };
            };
            let j = call / 2;
            linearized[j / 64] &= !(1 << (j % 64));
            state = previous;
            unlift(&mut next, &mut prev, call);
            entry = next[call];
        }
    }
    Verdict::Linearizable
}

/// What the whole history check found.
#[derive(Debug, Default)]
pub struct Report {
    pub keys_checked: usize,
    pub anomalies: Vec<String>,
}

/// Every check on a run's history. `register_keys` are checked for linearizability; every key
/// for revision consistency and monotonic stale reads.
pub fn check(ops: &[Op], register_keys: &[String], budget: u64) -> Report {
    let mut report = Report::default();
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (key, key_ops) in &by_key {
        // One revision names one value and one value one revision: each write is one log entry.
        let mut value_at: HashMap<u64, u64> = HashMap::new();
        let mut revision_of: HashMap<u64, u64> = HashMap::new();
        for op in key_ops {
            let seen = match (&op.request, &op.outcome) {
                (
                    _,
                    Outcome::Read {
                        value: Some(v),
                        revision,
                    },
                ) => Some((*v, *revision)),
                (Request::Write { value } | Request::Cas { value, .. }, Outcome::Written { revision }) => {
                    Some((*value, *revision))
                }
                _ => None,
            };
            if let Some((v, rev)) = seen {
                if *value_at.entry(rev).or_insert(v) != v || *revision_of.entry(v).or_insert(rev) != rev {
                    report.anomalies.push(format!(
                        "key {key}: value {v} at revision {rev} contradicts another observation (op {})",
                        op.id
                    ));
                }
            }
        }
        check_stale_reads(key, key_ops, &mut report);
        if register_keys.iter().any(|k| k == key) {
            report.keys_checked += 1;
            match check_key(key_ops, &value_at, budget) {
                Verdict::Linearizable => {}
                Verdict::NotLinearizable { stuck_at } => report
                    .anomalies
                    .push(format!("key {key}: not linearizable; no order gets past op {stuck_at}")),
                Verdict::Inconclusive => report
                    .anomalies
                    .push(format!("key {key}: linearizability check exceeded its budget")),
            }
        }
    }
    report
}

/// A member's local copy only moves forward: a stale read that began after another stale read of
/// the same key on the same member completed sees at least its revision.
fn check_stale_reads(key: &str, ops: &[&Op], report: &mut Report) {
    let mut per_member: BTreeMap<usize, Vec<(u64, u64, u64, usize)>> = BTreeMap::new();
    for op in ops {
        if let (Request::StaleRead, Outcome::Read { revision, .. }, Some(done)) =
            (&op.request, &op.outcome, op.complete_ns)
        {
            per_member
                .entry(op.member)
                .or_default()
                .push((op.invoke_ns, done, *revision, op.id));
        }
    }
    for (member, mut reads) in per_member {
        let mut by_completion = reads.clone();
        by_completion.sort_by_key(|r| r.1);
        reads.sort_by_key(|r| r.0);
        let (mut j, mut floor, mut floor_op) = (0, 0u64, usize::MAX);
        for (invoke, _, revision, id) in reads {
            while j < by_completion.len() && by_completion[j].1 < invoke {
                if by_completion[j].2 > floor {
                    floor = by_completion[j].2;
                    floor_op = by_completion[j].3;
                }
                j += 1;
            }
            if revision < floor {
                report.anomalies.push(format!(
                    "key {key}: stale read op {id} on member index {member} saw revision {revision} after op \
                     {floor_op} had seen {floor}"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: usize, request: Request, invoke: u64, complete: Option<u64>, outcome: Outcome) -> Op {
        Op {
            id,
            client: id,
            member: 0,
            key: "k".into(),
            request,
            invoke_ns: invoke,
            complete_ns: complete,
            outcome,
        }
    }

    fn read(id: usize, i: u64, c: u64, value: Option<u64>, revision: u64) -> Op {
        op(id, Request::Read, i, Some(c), Outcome::Read { value, revision })
    }

    fn write(id: usize, i: u64, c: Option<u64>, value: u64, revision: u64) -> Op {
        let outcome = match c {
            Some(_) => Outcome::Written { revision },
            None => Outcome::Unknown {
                reason: "timeout".into(),
            },
        };
        op(id, Request::Write { value }, i, c, outcome)
    }

    fn verdict(ops: &[Op]) -> Report {
        check(ops, &["k".to_string()], 1_000_000)
    }

    #[test]
    fn sequential_and_concurrent_histories_that_have_an_order_pass() {
        let ops = vec![
            write(0, 0, Some(10), 1, 5),
            read(1, 11, 20, Some(1), 5),
            write(2, 21, Some(40), 2, 8),
            // Concurrent with the second write: may see either value.
            read(3, 22, 30, Some(1), 5),
            read(4, 25, 45, Some(2), 8),
        ];
        assert!(verdict(&ops).anomalies.is_empty(), "{:?}", verdict(&ops));
    }

    #[test]
    fn a_read_of_an_overwritten_value_after_the_overwrite_completed_fails() {
        let ops = vec![
            write(0, 0, Some(10), 1, 5),
            write(1, 11, Some(20), 2, 8),
            read(2, 21, 30, Some(1), 5),
        ];
        let r = verdict(&ops);
        assert!(r.anomalies.iter().any(|a| a.contains("not linearizable")), "{r:?}");
    }

    #[test]
    fn an_unknown_write_may_apply_late_or_never_but_not_be_seen_then_unseen() {
        let late = vec![
            write(0, 0, None, 1, 0),
            read(1, 10, 20, None, 0),
            read(2, 30, 40, Some(1), 3),
        ];
        assert!(verdict(&late).anomalies.is_empty(), "{:?}", verdict(&late));
        let never = vec![write(0, 0, None, 1, 0), read(1, 10, 20, None, 0)];
        assert!(verdict(&never).anomalies.is_empty());
        let flicker = vec![
            write(0, 0, None, 1, 0),
            read(1, 10, 20, Some(1), 3),
            read(2, 30, 40, None, 0),
        ];
        assert!(!verdict(&flicker).anomalies.is_empty());
    }

    #[test]
    fn cas_succeeds_only_from_the_value_it_expected_and_a_refusal_changes_nothing() {
        let cas = |id, i, c, from, rev, to, outcome| {
            op(
                id,
                Request::Cas {
                    expect_value: from,
                    expect_revision: rev,
                    value: to,
                },
                i,
                c,
                outcome,
            )
        };
        let ok = vec![
            write(0, 0, Some(10), 1, 5),
            cas(1, 11, Some(20), 1, 5, 2, Outcome::Written { revision: 9 }),
            cas(
                2,
                21,
                Some(30),
                1,
                5,
                3,
                Outcome::CasFailed {
                    current_revision: Some(9),
                },
            ),
            read(3, 31, 40, Some(2), 9),
        ];
        assert!(verdict(&ok).anomalies.is_empty(), "{:?}", verdict(&ok));
        let lost_update = vec![
            write(0, 0, Some(10), 1, 5),
            cas(1, 11, Some(20), 1, 5, 2, Outcome::Written { revision: 9 }),
            cas(2, 21, Some(30), 1, 5, 3, Outcome::Written { revision: 12 }),
        ];
        assert!(!verdict(&lost_update).anomalies.is_empty());
    }

    #[test]
    fn stale_reads_going_backwards_on_one_member_are_reported() {
        let stale = |id, i, c, revision| {
            op(
                id,
                Request::StaleRead,
                i,
                Some(c),
                Outcome::Read {
                    value: Some(revision),
                    revision,
                },
            )
        };
        let ops = vec![stale(0, 0, 10, 7), stale(1, 20, 30, 5)];
        let r = check(&ops, &[], 1000);
        assert!(r.anomalies.iter().any(|a| a.contains("stale read")), "{r:?}");
        let overlapping = vec![stale(0, 0, 10, 7), stale(1, 5, 30, 5)];
        assert!(check(&overlapping, &[], 1000).anomalies.is_empty());
    }
}
