//! Durable acceptor state: written to a temp file, fsynced, renamed over the old file, and the
//! directory fsynced, before the reply that depends on it may leave.
//!
//! A crash between any two steps leaves either the old file or the new one; torn temp files are
//! ignored (and removed) on load.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::core::paxos::Durable;
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

/// `data_dir/paxos.json`, replaced atomically.
pub struct FileStore {
    dir: PathBuf,
}

const STATE: &str = "paxos.json";
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
    pub fn clear(&self) -> io::Result<()> {
        for name in [STATE, LEARNED] {
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
        self.read_file(STATE)
    }
    fn save(&mut self, d: &Durable) -> io::Result<()> {
        self.write_file(STATE, d, Step::SyncDir, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::paxos::{AcceptorState, Ballot};
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

    #[test]
    fn corrupt_state_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("paxos.json"), b"{not json").unwrap();
        let mut s = FileStore::open(dir.path()).unwrap();
        assert!(s.load().is_err());
    }
}
