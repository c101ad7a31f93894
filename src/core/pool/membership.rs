//! The agreed membership: voters (each change of them a new epoch), recorded learners and
//! their addresses, and autopilot's changes of them.

use super::{check_peer, ChangeError, NodeId, Pool, PoolChange, Rules};

impl Pool {
    /// `AddPeer`: a voter (a new membership epoch) or a recorded learner; a recorded learner
    /// added as a voter is promoted.
    pub(super) fn add_peer(
        &mut self,
        id: &NodeId,
        addr: &str,
        learner: bool,
    ) -> Result<(), ChangeError> {
        self.has_membership()?;
        check_peer(id, addr).map_err(ChangeError::InvalidPeer)?;
        if self.voters.contains(id) || (learner && self.learners.contains(id)) {
            return Err(ChangeError::PeerExists(id.clone()));
        }
        self.addrs.insert(id.clone(), addr.to_string());
        if learner {
            self.learners.insert(id.clone());
        } else {
            self.learners.remove(id);
            self.voters.insert(id.clone());
            self.epoch += 1;
        }
        self.membership_note = None;
        Ok(())
    }

    /// `RemovePeer`: removing a voter starts a new membership epoch and drops its votes.
    pub(super) fn remove_peer(&mut self, id: &NodeId) -> Result<(), ChangeError> {
        self.has_membership()?;
        if self.voters.contains(id) {
            if self.voters.len() == 1 {
                return Err(ChangeError::LastVoter(id.clone()));
            }
            self.voters.remove(id);
            self.epoch += 1;
            self.forget_votes(id);
        } else if !self.learners.remove(id) {
            return Err(ChangeError::PeerNotFound(id.clone()));
        }
        self.addrs.remove(id);
        self.membership_note = None;
        Ok(())
    }

    /// `Autopilot`: its `AddPeer` or `RemovePeer` applied, with the reason kept.
    pub(super) fn autopiloted(
        &self,
        change: &PoolChange,
        why: &str,
        rules: &Rules,
    ) -> Result<Pool, ChangeError> {
        if !matches!(
            change,
            PoolChange::AddPeer { .. } | PoolChange::RemovePeer { .. }
        ) {
            return Err(ChangeError::InvalidPeer(
                "autopilot changes only the membership".into(),
            ));
        }
        let mut next = self.apply(change, rules)?;
        next.membership_note = Some(format!("autopilot: {why}"));
        Ok(next)
    }

    /// Peers are added and removed only once the voters are agreed.
    fn has_membership(&self) -> Result<(), ChangeError> {
        if self.voters.is_empty() {
            return Err(ChangeError::InvalidPeer(
                "the cluster has no agreed membership yet".into(),
            ));
        }
        Ok(())
    }

    /// Drop every health and discovery vote of `peer`.
    pub(super) fn forget_votes(&mut self, peer: &NodeId) {
        for b in self.backends.values_mut() {
            b.down_votes.remove(peer);
        }
        for s in self.sightings.values_mut() {
            s.seen_by.remove(peer);
        }
        self.sightings.retain(|_, s| !s.seen_by.is_empty());
    }
}
