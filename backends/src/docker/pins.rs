//! Blobs of the export cache that must not be deleted right now: those being streamed to a
//! client, and those an export has written but not yet recorded in an entry. Eviction and
//! the clean-up after an export both delete through here, under the same lock that pins, so
//! a blob another export has just written (it pins before it renames into place) or is
//! about to record is never taken from under it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferry_core::{BlobStore, Digest};

/// Pin counts by digest.
#[derive(Clone, Default)]
pub struct Pins(Arc<Mutex<HashMap<Digest, usize>>>);

impl Pins {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pins `digest` until the returned [`Pin`] is dropped.
    pub fn pin(&self, digest: &Digest) -> Pin {
        *self.lock().entry(digest.clone()).or_default() += 1;
        Pin {
            digest: digest.clone(),
            pins: self.clone(),
        }
    }

    /// Deletes `digest` from `store` when nobody pins it; `true` when a file was removed.
    pub fn remove_unpinned(&self, store: &BlobStore, digest: &Digest) -> bool {
        self.remove_if_at_most(store, digest, 0)
    }

    /// Deletes the blob behind `pin` when that pin is its only one; the pin is released.
    pub fn remove_if_sole(&self, store: &BlobStore, pin: Pin) -> bool {
        self.remove_if_at_most(store, &pin.digest, 1)
    }

    fn remove_if_at_most(&self, store: &BlobStore, digest: &Digest, count: usize) -> bool {
        let pins = self.lock();
        if pins.get(digest).copied().unwrap_or(0) > count {
            return false;
        }
        // Under the lock: nobody can pin (and then place) this blob while it is removed.
        std::fs::remove_file(store.path(digest)).is_ok()
    }
}

/// One pin on a blob; dropping it releases the pin.
pub struct Pin {
    pub digest: Digest,
    pins: Pins,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = self.pins.lock();
        if let Some(n) = pins.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.digest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pinned_blob_survives_removal_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let d = store.write_bytes(bytes::Bytes::from_static(b"layer")).await.unwrap();
        let pins = Pins::default();

        let serving = pins.pin(&d);
        let mine = pins.pin(&d);
        assert!(!pins.remove_unpinned(&store, &d));
        assert!(!pins.remove_if_sole(&store, mine), "another pin holds it");
        assert!(store.path(&d).exists());

        drop(serving);
        let mine = pins.pin(&d);
        assert!(pins.remove_if_sole(&store, mine));
        assert!(!store.path(&d).exists());
        assert!(pins.lock().is_empty(), "every pin released");
    }
}
