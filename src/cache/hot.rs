//! The modules a hit is served from without touching the disk: small ones as bytes in memory
//! (at most `[cache] memory_size` in all), large ones as open files (at most [`MAX_FILES`]),
//! which the socket sends from the page cache. Eviction is second-chance FIFO: a hit only
//! sets a flag, so the hot path takes one short lock and never reorders anything.
//!
//! Only intact blobs enter (the cache checks before it inserts), and every removal of a
//! module from the cache removes it here too, so a purged module is never served from here.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::digest::Digest;

/// Modules up to this size are held in memory (when `memory_size` allows).
pub const MAX_MEMORY_MODULE: u64 = 1 << 20;
/// Open files held at most (each holds a file descriptor).
pub const MAX_FILES: usize = 256;

/// A module ready to be served.
#[derive(Debug, Clone)]
pub enum Resident {
    /// The whole module.
    Memory(Bytes),
    /// The open blob (read it with positional reads or `sendfile`: the handle is shared)
    /// and its length.
    File(Arc<std::fs::File>, u64),
}

impl Resident {
    /// The module's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Resident::Memory(b) => b.len() as u64,
            Resident::File(_, len) => *len,
        }
    }

    /// True for an empty module (never a valid one; for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of memory it holds.
    fn cost(&self) -> u64 {
        match self {
            Resident::Memory(b) => b.len() as u64,
            Resident::File(..) => 0,
        }
    }
}

/// One held module.
#[derive(Debug)]
struct Entry {
    /// What is served.
    body: Resident,
    /// Served since the eviction scan last passed it (its second chance).
    referenced: bool,
}

/// The state behind the lock.
#[derive(Debug, Default)]
struct State {
    /// Held modules.
    map: HashMap<Digest, Entry>,
    /// Eviction order (oldest first); may name modules already removed.
    queue: VecDeque<Digest>,
    /// Sum of memory held.
    bytes: u64,
    /// Open files held.
    files: usize,
    /// Bumped by every removal, so a module opened before a purge is not inserted after it.
    epoch: u64,
}

/// The hot set. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Hot {
    /// Shared state.
    state: Arc<Mutex<State>>,
    /// `[cache] memory_size`.
    budget: u64,
}

impl Hot {
    /// An empty set holding at most `budget` bytes of module memory.
    pub fn new(budget: u64) -> Hot {
        Hot {
            state: Arc::default(),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a module of `len` bytes is worth reading into memory.
    pub fn holds_in_memory(&self, len: u64) -> bool {
        len <= MAX_MEMORY_MODULE && len <= self.budget
    }

    /// The held module `d`, marking it used.
    pub fn get(&self, d: &Digest) -> Option<Resident> {
        let mut st = self.lock();
        let e = st.map.get_mut(d)?;
        e.referenced = true;
        Some(e.body.clone())
    }

    /// The current epoch; pass it to [`Hot::insert`].
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Holds `body` for `d` unless a removal happened since `epoch` was read (the module may
    /// have been purged while it was being opened). Evicts what no longer fits.
    pub fn insert(&self, d: Digest, body: Resident, epoch: u64) {
        let mut st = self.lock();
        if st.epoch != epoch || st.map.contains_key(&d) || body.cost() > self.budget {
            return;
        }
        st.bytes += body.cost();
        if matches!(body, Resident::File(..)) {
            st.files += 1;
        }
        st.map.insert(
            d,
            Entry {
                body,
                referenced: false,
            },
        );
        st.queue.push_back(d);
        // Each entry gets at most one second chance per pass, so this ends.
        let mut budget = 2 * st.queue.len();
        while (st.bytes > self.budget || st.files > MAX_FILES) && budget > 0 {
            budget -= 1;
            let Some(victim) = st.queue.pop_front() else {
                break;
            };
            let Some(e) = st.map.get_mut(&victim) else {
                continue;
            };
            if e.referenced {
                e.referenced = false;
                st.queue.push_back(victim);
                continue;
            }
            drop_entry(&mut st, &victim);
        }
    }

    /// Forgets the modules `ds` (they are being removed from the cache).
    pub fn remove(&self, ds: &[Digest]) {
        let mut st = self.lock();
        st.epoch += 1;
        for d in ds {
            drop_entry(&mut st, d);
        }
        // Keep the queue from growing with the names of removed modules.
        if st.queue.len() > 2 * st.map.len() + 64 {
            let State { map, queue, .. } = &mut *st;
            queue.retain(|d| map.contains_key(d));
        }
    }

    /// Memory held, in bytes.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

fn drop_entry(st: &mut State, d: &Digest) {
    if let Some(e) = st.map.remove(d) {
        st.bytes -= e.body.cost();
        if matches!(e.body, Resident::File(..)) {
            st.files -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(n: usize) -> Resident {
        Resident::Memory(Bytes::from(vec![0u8; n]))
    }

    fn d(i: u8) -> Digest {
        Digest::of(&[i])
    }

    #[test]
    fn memory_stays_within_the_budget_and_used_entries_get_a_second_chance() {
        let hot = Hot::new(300);
        for i in 0..3 {
            hot.insert(d(i), mem(100), hot.epoch());
        }
        assert!(hot.get(&d(0)).is_some());
        hot.insert(d(3), mem(100), hot.epoch());
        assert_eq!(hot.bytes(), 300);
        assert!(hot.get(&d(0)).is_some(), "a used entry is kept");
        assert!(
            hot.get(&d(1)).is_none(),
            "the oldest unused entry is evicted"
        );
        assert!(hot.get(&d(3)).is_some());
    }

    #[test]
    fn a_module_over_the_budget_is_not_held() {
        let hot = Hot::new(10);
        hot.insert(d(0), mem(11), hot.epoch());
        assert!(hot.get(&d(0)).is_none());
        assert_eq!(hot.bytes(), 0);
        assert!(!hot.holds_in_memory(11) && hot.holds_in_memory(10));
    }

    #[test]
    fn a_module_opened_before_a_removal_is_not_inserted_after_it() {
        let hot = Hot::new(1000);
        let epoch = hot.epoch();
        hot.remove(&[d(0)]);
        hot.insert(d(0), mem(10), epoch);
        assert!(hot.get(&d(0)).is_none());
    }

    #[test]
    fn open_files_are_bounded() {
        let hot = Hot::new(0);
        let f = Arc::new(tempfile::tempfile().unwrap());
        for i in 0..=MAX_FILES {
            let mut digest = [0u8; 2];
            digest.copy_from_slice(&(i as u16).to_be_bytes());
            hot.insert(
                Digest::of(&digest),
                Resident::File(Arc::clone(&f), 1),
                hot.epoch(),
            );
        }
        assert_eq!(hot.lock().files, MAX_FILES);
        assert_eq!(hot.lock().map.len(), MAX_FILES);
    }
}
