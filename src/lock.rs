//! `lock`: the one lock-poisoning policy for std locks: a poisoned lock is recovered.
//!
//! A std `Mutex`/`RwLock` is poisoned when a thread panics while holding it. Every critical
//! section in this crate leaves its data consistent before anything that could panic (no
//! partial updates across a call that may fail), so the data behind a poisoned lock is
//! still valid: taking it over keeps one panicking task from taking every later request
//! down with it. The policy is enforced by clippy (`disallowed-methods` in clippy.toml bans
//! the bare `lock`/`read`/`write`); these traits are the one place that calls them.

#![allow(clippy::disallowed_methods)]

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// [`Mutex::lock`] under the crate's poisoning policy.
pub trait MutexExt<T: ?Sized> {
    /// Locks, taking over the data if a panicking holder poisoned the lock.
    fn lock_recovered(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    fn lock_recovered(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// [`RwLock::read`] / [`RwLock::write`] under the crate's poisoning policy.
pub trait RwLockExt<T: ?Sized> {
    /// Shared access, taking over the data if a panicking writer poisoned the lock.
    fn read_recovered(&self) -> RwLockReadGuard<'_, T>;
    /// Exclusive access, taking over the data if a panicking writer poisoned the lock.
    fn write_recovered(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    fn read_recovered(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_recovered(&self) -> RwLockWriteGuard<'_, T> {
        self.write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_is_recovered_with_its_data() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let held = m.clone();
        let _ = std::thread::spawn(move || {
            let mut g = held.lock_recovered();
            *g = 2;
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*m.lock_recovered(), 2);
    }

    #[test]
    fn a_poisoned_rwlock_is_recovered_for_reads_and_writes() {
        let l = std::sync::Arc::new(RwLock::new(vec![1]));
        let held = l.clone();
        let _ = std::thread::spawn(move || {
            held.write_recovered().push(2);
            let _g = held.write_recovered();
            panic!("poison it");
        })
        .join();
        assert!(l.is_poisoned());
        assert_eq!(*l.read_recovered(), vec![1, 2]);
        l.write_recovered().push(3);
        assert_eq!(l.read_recovered().len(), 3);
    }
}
