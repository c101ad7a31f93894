//! Durable acceptor state: written to a temp file, fsynced, renamed over the old file, and the
//! directory fsynced, before the reply that depends on it may leave.
//!
//! A crash between any two steps leaves either the old file or the new one; torn temp files are
//! ignored (and removed) on load.
//!
//! The accepted value (the whole pool) lives in `accepted.json`, written only when an accept
//! changes it; `paxos.json` holds the rest (promise, accepted ballot, counter reservation), so a
//! promise rewrites a few hundred bytes, not the pool. `accepted.json` is written first: a crash
//! between the two leaves an accepted value newer than `paxos.json` says, which load takes (with
//! the promise raised to its ballot), as if the acceptor had accepted and crashed before its
//! reply. A `paxos.json` that holds the value itself (written before the split) loads as it is.
//!
//! By the same rule an accept writes only `accepted.json` when that is all that changed: the
//! accepted ballot moved to the one `accepted.json` now holds, and the promise with it (an
//! acceptor raises its promise to what it accepts), which is what load derives from the pair.
//! A CASPaxos round (a change, or a round that rewrites the value as it is) then costs one
//! atomic replacement and two fsyncs, where it cost two replacements and four fsyncs.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::core::paxos::{Ballot, Durable};
use crate::core::pool::Pool;

/// Where a node keeps its Paxos state.
pub trait Storage: Send + 'static {
    fn load(&mut self) -> io::Result<Option<Durable>>;
    /// Must be durable when this returns.
    fn save(&mut self, d: &Durable) -> io::Result<()>;
}

/// In memory (tests and demos without a disk).
#[derive(Default)]
pub struct MemStore(pub Option<Durable>);

impl Storage for MemStore {
    fn load(&mut self) -> io::Result<Option<Durable>> {
        Ok(self.0.clone())
    }
    fn save(&mut self, d: &Durable) -> io::Result<()> {
        self.0 = Some(d.clone());
        Ok(())
    }
}

/// `data_dir/paxos.json` and `data_dir/accepted.json`, each replaced atomically.
pub struct FileStore {
    dir: PathBuf,
    /// The accepted ballot `accepted.json` holds, once this store wrote or read it.
    value_at: Option<Ballot>,
    /// What `paxos.json` holds, once this store wrote it.
    state_at: Option<Durable>,
    /// How many times the accepted value was written (tests count it).
    pub value_writes: u64,
    /// How many times `paxos.json` was written (tests count it).
    pub state_writes: u64,
}

const STATE: &str = "paxos.json";
const ACCEPTED: &str = "accepted.json";

/// What `accepted.json` holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Accepted {
    ballot: Ballot,
    value: Pool,
}
const LEARNED: &str = "learned.json";

/// The steps of a save, in order (a test stops after each to play a crash).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    WriteTemp,
    SyncTemp,
    Rename,
    SyncDir,
}

impl FileStore {
    /// Open (creating) `dir`.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            value_at: None,
            state_at: None,
            value_writes: 0,
            state_writes: 0,
        })
    }

    fn tmp_name(name: &str) -> String {
        format!("{name}.tmp")
    }

    /// Write `value` as `name`, stopping after `stop` (tests only pass something other than
    /// `SyncDir`; a torn write is played by writing half the bytes).
    pub fn write_file<T: Serialize>(
        &self,
        name: &str,
        value: &T,
        stop: Step,
        torn: bool,
    ) -> io::Result<()> {
        let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
        let tmp = self.dir.join(Self::tmp_name(name));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        if torn {
            f.write_all(&bytes[..bytes.len() / 2])?;
            return Ok(());
        }
        f.write_all(&bytes)?;
        if stop == Step::WriteTemp {
            return Ok(());
        }
        f.sync_all()?;
        if stop == Step::SyncTemp {
            return Ok(());
        }
        fs::rename(&tmp, self.dir.join(name))?;
        if stop == Step::Rename {
            return Ok(());
        }
        File::open(&self.dir)?.sync_all()
    }

    fn read_file<T: DeserializeOwned>(&self, name: &str) -> io::Result<Option<T>> {
        // A temp file is a save that never completed: it is not the state.
        let _ = fs::remove_file(self.dir.join(Self::tmp_name(name)));
        match fs::read(self.dir.join(name)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{name}: {e}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The last pool this peer learned (best effort: it is only a routing hint at start-up).
    pub fn load_learned(&self) -> Option<Pool> {
        self.read_file(LEARNED).ok().flatten()
    }

    /// Keep `pool` as the routing hint, durably (`--force-new-cluster`, before the peer starts
    /// from it).
    pub fn save_learned(&self, pool: &Pool) -> io::Result<()> {
        self.write_file(LEARNED, pool, Step::SyncDir, false)
    }

    /// Keep `pool` as the routing hint, without waiting for the disk: a crash may leave the
    /// hint before it, or none (a torn file reads as none), and the peer then routes from that
    /// until its cluster answers, as it does from any hint. What a peer agreed to is in its
    /// acceptor's files, written durably before any reply; this one is only what it learned,
    /// and each change's two fsyncs here were a third of a pool change's cost.
    pub fn save_learned_hint(&self, pool: &Pool) -> io::Result<()> {
        let bytes = serde_json::to_vec(pool).map_err(io::Error::other)?;
        let tmp = self.dir.join(Self::tmp_name(LEARNED));
        fs::write(&tmp, bytes)?;
        fs::rename(&tmp, self.dir.join(LEARNED))
    }

    /// Forget everything: the node starts over with no state (a one-node cluster it formed
    /// alone, abandoned for the cluster that lists it as a voter).
    pub fn clear(&mut self) -> io::Result<()> {
        self.value_at = None;
        self.state_at = None;
        for name in [STATE, ACCEPTED, LEARNED] {
            match fs::remove_file(self.dir.join(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        File::open(&self.dir)?.sync_all()
    }
}

impl Storage for FileStore {
    fn load(&mut self) -> io::Result<Option<Durable>> {
        let Some(mut d) = self.read_file::<Durable>(STATE)? else {
            return Ok(None);
        };
        if let Some(a) = self.read_file::<Accepted>(ACCEPTED)? {
            if a.ballot >= d.acceptor.accepted {
                if a.ballot > d.acceptor.promised {
                    d.acceptor.promised = a.ballot.clone();
                }
                d.acceptor.accepted = a.ballot.clone();
                d.acceptor.value = a.value;
                self.value_at = Some(a.ballot);
            }
        }
        Ok(Some(d))
    }
    fn save(&mut self, d: &Durable) -> io::Result<()> {
        if self.value_at.as_ref() != Some(&d.acceptor.accepted) {
            let a = Accepted {
                ballot: d.acceptor.accepted.clone(),
                value: d.acceptor.value.clone(),
            };
            self.write_file(ACCEPTED, &a, Step::SyncDir, false)?;
            self.value_at = Some(a.ballot);
            self.value_writes += 1;
        }
        let mut rest = d.clone();
        rest.acceptor.value = Pool::default();
        let implied = self
            .state_at
            .as_ref()
            .is_some_and(|written| implied(written, &rest, self.value_at.as_ref()));
        if implied {
            return Ok(());
        }
        self.write_file(STATE, &rest, Step::SyncDir, false)?;
        self.state_at = Some(rest);
        self.state_writes += 1;
        Ok(())
    }
}

/// Whether `paxos.json` as `written`, beside an `accepted.json` at ballot `value_at`, loads as
/// `rest`: the two differ in nothing but the accepted ballot, now `accepted.json`'s and no older
/// than the written one, and the promise, now the higher of the written one and that ballot
/// (see `load`).
fn implied(written: &Durable, rest: &Durable, value_at: Option<&Ballot>) -> bool {
    let accepted = &rest.acceptor.accepted;
    if value_at != Some(accepted) || *accepted < written.acceptor.accepted {
        return false;
    }
    let mut loaded = written.clone();
    loaded.acceptor.promised = (&written.acceptor.promised).max(accepted).clone();
    loaded.acceptor.accepted = accepted.clone();
    loaded == *rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::paxos::AcceptorState;
    use crate::core::pool::NodeId;

    fn state(n: u64) -> Durable {
        Durable {
            acceptor: AcceptorState {
                promised: Ballot::new(n, NodeId::new("a")),
                accepted: Ballot::new(n, NodeId::new("a")),
                value: Pool {
                    version: n,
                    ..Pool::default()
                },
            },
            counter_reserved: n * 1000,
            voting: true,
            incarnation: 7,
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::open(&dir.path().join("nested/data")).unwrap();
        assert_eq!(s.load().unwrap(), None);
        s.save(&state(3)).unwrap();
        let mut again = FileStore::open(&dir.path().join("nested/data")).unwrap();
        assert_eq!(again.load().unwrap(), Some(state(3)));
    }

    /// A crash between any two steps of a save leaves the old state or the new one, never a
    /// torn one; the state is the new one once the rename happened.
    #[test]
    fn survives_a_crash_between_any_two_steps() {
        for (stop, torn) in [
            (Step::WriteTemp, true),
            (Step::WriteTemp, false),
            (Step::SyncTemp, false),
            (Step::Rename, false),
            (Step::SyncDir, false),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut s = FileStore::open(dir.path()).unwrap();
            s.save(&state(1)).unwrap();
            s.write_file(STATE, &state(2), stop, torn).unwrap();
            // "Restart": a fresh store on the same directory.
            let mut after = FileStore::open(dir.path()).unwrap();
            let got = after.load().unwrap().unwrap();
            let expect = if stop >= Step::Rename {
                state(2)
            } else {
                state(1)
            };
            assert_eq!(got, expect, "crash after {stop:?} (torn {torn})");
            assert!(
                !dir.path().join("paxos.json.tmp").exists(),
                "temp file cleaned up"
            );
            // And the store keeps working.
            after.save(&state(4)).unwrap();
            assert_eq!(after.load().unwrap(), Some(state(4)));
        }
    }

    /// A promise rewrites only `paxos.json`; the pool is written when an accept changes it.
    /// Either file may be the newer one after a crash between them.
    #[test]
    fn a_promise_does_not_rewrite_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::open(dir.path()).unwrap();
        let mut d = state(3);
        s.save(&d).unwrap();
        d.acceptor.promised = Ballot::new(9, NodeId::new("b"));
        s.save(&d).unwrap();
        assert_eq!(s.value_writes, 1);
        assert!(
            std::fs::metadata(dir.path().join("paxos.json"))
                .unwrap()
                .len()
                < 400
        );
        assert_eq!(
            FileStore::open(dir.path()).unwrap().load().unwrap(),
            Some(d.clone())
        );
        // An accept: the value is written, first.
        let mut e = state(10);
        e.acceptor.promised = Ballot::new(10, NodeId::new("a"));
        s.save(&e).unwrap();
        assert_eq!(s.value_writes, 2);
        // A crash after accepted.json but before paxos.json: the accept is there, the promise
        // raised to it.
        let mut f = e.clone();
        f.acceptor.accepted = Ballot::new(11, NodeId::new("c"));
        f.acceptor.value.version = 11;
        s.write_file(
            ACCEPTED,
            &Accepted {
                ballot: f.acceptor.accepted.clone(),
                value: f.acceptor.value.clone(),
            },
            Step::SyncDir,
            false,
        )
        .unwrap();
        let got = FileStore::open(dir.path())
            .unwrap()
            .load()
            .unwrap()
            .unwrap();
        assert_eq!(got.acceptor.accepted, f.acceptor.accepted);
        assert_eq!(got.acceptor.value, f.acceptor.value);
        assert_eq!(got.acceptor.promised, f.acceptor.accepted);
        // A paxos.json from before the split (the value inside) loads as it is.
        let old = tempfile::tempdir().unwrap();
        let s2 = FileStore::open(old.path()).unwrap();
        s2.write_file(STATE, &state(4), Step::SyncDir, false)
            .unwrap();
        assert_eq!(
            FileStore::open(old.path()).unwrap().load().unwrap(),
            Some(state(4))
        );
    }

    /// An accept that changes nothing but the accepted ballot (and the promise with it) writes
    /// `accepted.json` alone, and a restart after each save loads the state saved.
    #[test]
    fn an_accept_writes_the_value_alone_and_every_save_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::open(dir.path()).unwrap();
        let mut d = state(3);
        s.save(&d).unwrap();
        let (values, states) = (s.value_writes, s.state_writes);
        // The accept of a round at a higher ballot: promise and accepted ballot move together.
        d.acceptor.promised = Ballot::new(4, NodeId::new("b"));
        d.acceptor.accepted = d.acceptor.promised.clone();
        d.acceptor.value.version = 4;
        s.save(&d).unwrap();
        assert_eq!((s.value_writes, s.state_writes), (values + 1, states));
        assert_eq!(
            FileStore::open(dir.path()).unwrap().load().unwrap(),
            Some(d.clone())
        );
        // A round that rewrites the value as it is: the same.
        d.acceptor.promised = Ballot::new(5, NodeId::new("a"));
        d.acceptor.accepted = d.acceptor.promised.clone();
        s.save(&d).unwrap();
        assert_eq!((s.value_writes, s.state_writes), (values + 2, states));
        assert_eq!(
            FileStore::open(dir.path()).unwrap().load().unwrap(),
            Some(d.clone())
        );
        // A reservation moved beside the accept: paxos.json too.
        d.acceptor.promised = Ballot::new(6, NodeId::new("a"));
        d.acceptor.accepted = d.acceptor.promised.clone();
        d.counter_reserved += 1000;
        s.save(&d).unwrap();
        assert_eq!((s.value_writes, s.state_writes), (values + 3, states + 1));
        assert_eq!(
            FileStore::open(dir.path()).unwrap().load().unwrap(),
            Some(d)
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any sequence of acceptor steps (promises, accepts of new values or the same one,
        /// reservations, a vote given or taken), saved one by one: a restart after any of them
        /// loads exactly the last state saved.
        #[test]
        fn a_restart_loads_the_last_state_saved(
            steps in proptest::collection::vec((0u8..6, 1u64..4, 0usize..3), 1..24),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut s = FileStore::open(dir.path()).unwrap();
            let mut d = Durable {
                acceptor: AcceptorState::default(),
                counter_reserved: 0,
                voting: true,
                incarnation: 1,
            };
            let nodes = ["a", "b", "c"];
            let mut counter = 0;
            for (i, (kind, up, node)) in steps.iter().enumerate() {
                counter += up;
                let ballot = Ballot::new(counter, NodeId::new(nodes[*node]));
                match kind {
                    // A promise.
                    0 => d.acceptor.promised = ballot,
                    // An accept of a new value: the promise moves to it.
                    1 => {
                        d.acceptor.promised = ballot.clone();
                        d.acceptor.accepted = ballot;
                        d.acceptor.value.version = counter;
                    }
                    // An accept of the value as it is.
                    2 => {
                        d.acceptor.promised = ballot.clone();
                        d.acceptor.accepted = ballot;
                    }
                    // A round's prepare, then its accept at the ballot promised.
                    3 => {
                        d.acceptor.promised = ballot.clone();
                        s.save(&d).unwrap();
                        let got = FileStore::open(dir.path()).unwrap().load().unwrap();
                        proptest::prop_assert_eq!(got, Some(d.clone()), "prepare {}: {:?}", i, steps);
                        d.acceptor.accepted = ballot;
                        d.acceptor.value.version = counter;
                    }
                    4 => d.counter_reserved += 1000,
                    _ => d.voting = !d.voting,
                }
                s.save(&d).unwrap();
                let got = FileStore::open(dir.path()).unwrap().load().unwrap();
                proptest::prop_assert_eq!(got, Some(d.clone()), "after step {}: {:?}", i, steps);
            }
        }
    }

    /// The routing hint written without fsyncs loads back; a torn one, or one never renamed
    /// into place, reads as the hint before it or none, never as an error.
    #[test]
    fn a_learned_hint_loads_back_and_a_torn_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        assert_eq!(s.load_learned(), None);
        let pool = |v| Pool {
            version: v,
            ..Pool::default()
        };
        s.save_learned_hint(&pool(3)).unwrap();
        assert_eq!(
            FileStore::open(dir.path()).unwrap().load_learned(),
            Some(pool(3))
        );
        // A crash before the rename: the hint before it.
        std::fs::write(dir.path().join("learned.json.tmp"), b"{\"vers").unwrap();
        assert_eq!(
            FileStore::open(dir.path()).unwrap().load_learned(),
            Some(pool(3))
        );
        // A torn file in place (a crash after a rename the disk had not the data of): none.
        std::fs::write(dir.path().join("learned.json"), b"").unwrap();
        assert_eq!(FileStore::open(dir.path()).unwrap().load_learned(), None);
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("paxos.json"), b"{not json").unwrap();
        let mut s = FileStore::open(dir.path()).unwrap();
        assert!(s.load().is_err());
    }
}
