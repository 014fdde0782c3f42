//! One lock per key (volume or snapshot), created on demand and forgotten when released, so the
//! table never grows with the number of volumes ever seen. The controller waits for the lock
//! (creates of one name are short and serialising them gives every caller the same answer); the
//! node side uses `try_lock` and answers ABORTED, as the spec suggests for slow operations.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};

#[derive(Default, Clone)]
pub struct KeyedLocks {
    inner: Arc<(Mutex<HashSet<String>>, Condvar)>,
}

pub struct KeyGuard {
    inner: Arc<(Mutex<HashSet<String>>, Condvar)>,
    key: String,
}

impl KeyedLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Block until `key` is free, then hold it.
    pub fn lock(&self, key: &str) -> KeyGuard {
        let (set, cv) = &*self.inner;
        let mut held = set.lock().unwrap_or_else(|e| e.into_inner());
        while held.contains(key) {
            held = cv.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.insert(key.to_string());
        self.guard(key)
    }

    /// Hold `key` if nobody else does.
    pub fn try_lock(&self, key: &str) -> Option<KeyGuard> {
        let (set, _) = &*self.inner;
        let mut held = set.lock().unwrap_or_else(|e| e.into_inner());
        if !held.insert(key.to_string()) {
            return None;
        }
        Some(self.guard(key))
    }

    fn guard(&self, key: &str) -> KeyGuard {
        KeyGuard {
            inner: self.inner.clone(),
            key: key.to_string(),
        }
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        let (set, cv) = &*self.inner;
        set.lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn try_lock_excludes_and_release_frees() {
        let locks = KeyedLocks::new();
        let g = locks.try_lock("a").unwrap();
        assert!(locks.try_lock("a").is_none());
        assert!(locks.try_lock("b").is_some());
        drop(g);
        assert!(locks.try_lock("a").is_some());
    }

    #[test]
    fn lock_serialises_one_key() {
        let locks = KeyedLocks::new();
        let inside = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (locks, inside, max) = (locks.clone(), inside.clone(), max.clone());
                std::thread::spawn(move || {
                    let _g = locks.lock("k");
                    let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(n, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(max.load(Ordering::SeqCst), 1);
    }
}
