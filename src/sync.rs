//! One way to take a lock: a poisoned mutex (a thread panicked while holding it) still guards
//! data that every holder leaves consistent between statements, so it is taken, not propagated.

use std::sync::{Mutex, MutexGuard};

pub trait MutexExt<T> {
    /// Lock, taking the guard of a poisoned mutex too.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> MutexExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}
