//! Membership admission: whether a member may be added, promoted or removed, decided from the
//! applied membership and the leader's view of its peers, apart from the Ready loop that owns
//! the Raft node. Pure functions: the consensus thread gathers the facts and proposes only what
//! these allow.
//!
//! The rule behind every check: after the change, the voters that are healthy (the leader
//! itself, and peers heard from recently) must still be a majority of the voters, or the cluster
//! could not commit anything, the change's own successor included.

use std::collections::BTreeSet;

use crate::identity::MAX_MEMBER_ID;
use crate::inbox::AdminError;
use crate::kv::{MemberRole, Membership};

/// What the leader knows when it admits a change.
#[derive(Debug, Clone, Copy)]
pub struct LeaderView<'a> {
    /// The applied membership.
    pub membership: &'a Membership,
    /// The leader's own id (it is always healthy, and may not remove itself).
    pub leader_id: u64,
    /// Peers heard from recently.
    pub healthy: &'a BTreeSet<u64>,
    /// The largest lag, in entries, at which a learner may be promoted.
    pub max_promote_lag: u64,
}

/// What the leader's log says of a learner that asks to be promoted.
#[derive(Debug, Clone, Copy)]
pub struct LearnerProgress {
    /// The highest index the learner acknowledged; `None` when it acknowledged nothing yet.
    pub matched: Option<u64>,
    /// The leader's last log index.
    pub last_index: u64,
}

impl LeaderView<'_> {
    /// May `id` join, as a learner or (`learner` false) directly as a voter?
    pub fn admit_add(&self, id: u64, learner: bool) -> Result<(), AdminError> {
        if id == 0 || id > MAX_MEMBER_ID {
            return Err(AdminError::Invalid(format!(
                "member id must be between 1 and {MAX_MEMBER_ID}"
            )));
        }
        match self.membership.role_of(id) {
            MemberRole::Voter => return Err(AdminError::AlreadyMember { id, role: "voter" }),
            MemberRole::Learner => return Err(AdminError::AlreadyMember { id, role: "learner" }),
            MemberRole::Removed => return Err(AdminError::IdRemoved { id }),
            MemberRole::None => {}
        }
        if !learner {
            // A voter added empty raises the quorum before it can vote usefully: it does not count
            // as healthy until it has replicated.
            self.check_quorum_after(id, false, |voters| voters.push(id))?;
        }
        Ok(())
    }

    /// May learner `id` become a voter?
    pub fn admit_promote(&self, id: u64, progress: LearnerProgress) -> Result<(), AdminError> {
        match self.membership.role_of(id) {
            MemberRole::Learner => {}
            MemberRole::Voter => return Err(AdminError::AlreadyMember { id, role: "voter" }),
            _ => return Err(AdminError::NotMember { id }),
        }
        // Caught up means the learner itself acknowledged the log up to within the allowed lag:
        // `matched` moves only on its acknowledgements. A learner that acknowledged nothing yet
        // is refused however short the log is. The progress state is no guide: after a snapshot
        // raft-rs leaves an idle learner in Probe, not Replicate, until the next write.
        let matched = progress.matched.filter(|m| *m > 0);
        let lag = progress.last_index.saturating_sub(matched.unwrap_or(0));
        if matched.is_none() || lag > self.max_promote_lag {
            return Err(AdminError::LearnerLagging {
                id,
                lag,
                max: self.max_promote_lag,
            });
        }
        // A promotion raises the quorum: a learner that went silent after catching up would
        // count toward it without being able to vote.
        self.check_quorum_after(id, true, |voters| voters.push(id))
    }

    /// May member `id` leave?
    pub fn admit_remove(&self, id: u64) -> Result<(), AdminError> {
        match self.membership.role_of(id) {
            MemberRole::Voter if id == self.leader_id => Err(AdminError::IsLeader { id }),
            MemberRole::Voter => self.check_quorum_after(id, false, |voters| voters.retain(|v| *v != id)),
            MemberRole::Learner => Ok(()),
            _ => Err(AdminError::NotMember { id }),
        }
    }

    /// Refuses a change after which fewer healthy voters than a quorum would remain. The member
    /// `id` counts as healthy after the change only when `id_counts` (a promoted learner that was
    /// heard from recently); a new empty voter or a removed one never does.
    fn check_quorum_after(
        &self,
        id: u64,
        id_counts: bool,
        change: impl FnOnce(&mut Vec<u64>),
    ) -> Result<(), AdminError> {
        let mut voters: Vec<u64> = self.membership.voters.iter().copied().collect();
        change(&mut voters);
        if voters.is_empty() {
            return Err(AdminError::Invalid("a cluster needs at least one voter".into()));
        }
        let healthy = voters
            .iter()
            .filter(|&&v| v == self.leader_id || ((v != id || id_counts) && self.healthy.contains(&v)))
            .count();
        if healthy < voters.len() / 2 + 1 {
            return Err(AdminError::WouldLoseQuorum {
                id,
                healthy,
                voters: voters.len(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Voters 1 (the leader), 2 and 3, learner 4, removed 9.
    fn membership() -> Membership {
        let mut m = Membership::default();
        m.voters.extend([1, 2, 3]);
        m.learners.insert(4);
        m.removed.insert(9);
        m
    }

    fn view<'a>(membership: &'a Membership, healthy: &'a BTreeSet<u64>) -> LeaderView<'a> {
        LeaderView {
            membership,
            leader_id: 1,
            healthy,
            max_promote_lag: 10,
        }
    }

    fn caught_up() -> LearnerProgress {
        LearnerProgress {
            matched: Some(95),
            last_index: 100,
        }
    }

    #[test]
    fn members_and_removed_ids_cannot_be_added_again() {
        let (m, healthy) = (membership(), BTreeSet::from([2, 3, 4]));
        let v = view(&m, &healthy);
        assert_eq!(
            v.admit_add(2, true),
            Err(AdminError::AlreadyMember { id: 2, role: "voter" })
        );
        assert_eq!(
            v.admit_add(4, true),
            Err(AdminError::AlreadyMember { id: 4, role: "learner" })
        );
        assert_eq!(v.admit_add(9, true), Err(AdminError::IdRemoved { id: 9 }));
        assert!(matches!(v.admit_add(0, true), Err(AdminError::Invalid(_))));
        assert!(matches!(
            v.admit_add(MAX_MEMBER_ID + 1, true),
            Err(AdminError::Invalid(_))
        ));
        assert_eq!(v.admit_add(5, true), Ok(()));
    }

    #[test]
    fn a_voter_added_empty_must_not_cost_the_quorum() {
        let m = membership();
        let one_down = BTreeSet::from([2]);
        // Four voters then, healthy: the leader and 2; the newcomer does not count.
        assert_eq!(
            view(&m, &one_down).admit_add(5, false),
            Err(AdminError::WouldLoseQuorum {
                id: 5,
                healthy: 2,
                voters: 4
            })
        );
        assert_eq!(view(&m, &BTreeSet::from([2, 3])).admit_add(5, false), Ok(()));
    }

    #[test]
    fn a_learner_is_promoted_only_once_it_acknowledged_the_log_closely() {
        let (m, healthy) = (membership(), BTreeSet::from([2, 3, 4]));
        let v = view(&m, &healthy);
        assert_eq!(v.admit_promote(4, caught_up()), Ok(()));
        let lagging = LearnerProgress {
            matched: Some(80),
            last_index: 100,
        };
        assert_eq!(
            v.admit_promote(4, lagging),
            Err(AdminError::LearnerLagging {
                id: 4,
                lag: 20,
                max: 10
            })
        );
        let silent = LearnerProgress {
            matched: None,
            last_index: 3,
        };
        assert!(
            matches!(v.admit_promote(4, silent), Err(AdminError::LearnerLagging { .. })),
            "nothing acknowledged is never caught up, however short the log"
        );
        assert_eq!(
            v.admit_promote(2, caught_up()),
            Err(AdminError::AlreadyMember { id: 2, role: "voter" })
        );
        assert_eq!(v.admit_promote(7, caught_up()), Err(AdminError::NotMember { id: 7 }));
    }

    #[test]
    fn a_promotion_of_a_silent_learner_that_would_cost_the_quorum_is_refused() {
        let m = membership();
        // Voters 1, 2, 3 and 4 after; healthy: the leader and 2 only.
        let healthy = BTreeSet::from([2]);
        assert_eq!(
            view(&m, &healthy).admit_promote(4, caught_up()),
            Err(AdminError::WouldLoseQuorum {
                id: 4,
                healthy: 2,
                voters: 4
            })
        );
        assert_eq!(view(&m, &BTreeSet::from([2, 4])).admit_promote(4, caught_up()), Ok(()));
    }

    #[test]
    fn the_leader_stays_and_a_removal_keeps_a_healthy_quorum() {
        let m = membership();
        let all = BTreeSet::from([2, 3, 4]);
        assert_eq!(view(&m, &all).admit_remove(1), Err(AdminError::IsLeader { id: 1 }));
        assert_eq!(view(&m, &all).admit_remove(3), Ok(()));
        assert_eq!(view(&m, &all).admit_remove(4), Ok(()), "a learner holds no vote");
        assert_eq!(view(&m, &all).admit_remove(9), Err(AdminError::NotMember { id: 9 }));
        // Removing healthy 2 while 3 is down leaves the leader alone of two voters.
        let three_down = BTreeSet::from([2]);
        assert_eq!(
            view(&m, &three_down).admit_remove(2),
            Err(AdminError::WouldLoseQuorum {
                id: 2,
                healthy: 1,
                voters: 2
            })
        );
        assert_eq!(
            view(&m, &three_down).admit_remove(3),
            Ok(()),
            "removing the one that is down is fine"
        );
    }
}
