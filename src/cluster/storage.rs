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
    /// How many times the accepted value was written (tests count it).
    pub value_writes: u64,
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
            value_writes: 0,
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

    pub fn save_learned(&self, pool: &Pool) -> io::Result<()> {
        self.write_file(LEARNED, pool, Step::SyncDir, false)
    }

    /// Forget everything: the node starts over with no state (a one-node cluster it formed
    /// alone, abandoned for the cluster that lists it as a voter).
    pub fn clear(&mut self) -> io::Result<()> {
        self.value_at = None;
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
        self.write_file(STATE, &rest, Step::SyncDir, false)
    }
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

    #[test]
    fn corrupt_state_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("paxos.json"), b"{not json").unwrap();
        let mut s = FileStore::open(dir.path()).unwrap();
        assert!(s.load().is_err());
    }
}
