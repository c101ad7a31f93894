//! The agreed membership: voters (each change of them a new epoch), recorded learners and
//! their addresses.

use super::{check_peer, ChangeError, NodeId, Pool};

impl Pool {
    /// `AddPeer`: a voter (a new membership epoch) or a recorded learner; a recorded learner
    /// added as a voter is promoted.
    pub(super) fn add_peer(
        &mut self,
        id: &NodeId,
        addr: &str,
        learner: bool,
    ) -> Result<(), ChangeError> {
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
        Ok(())
    }

    /// `RemovePeer`: removing a voter starts a new membership epoch and drops its votes.
    pub(super) fn remove_peer(&mut self, id: &NodeId) -> Result<(), ChangeError> {
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
