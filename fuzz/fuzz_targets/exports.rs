//! `docker save` archives in both formats (legacy docker-archive, OCI layout) as a broken or
//! hostile engine could send them: reading and interpreting never panics and never hangs.
#![no_main]

use std::sync::{Mutex, OnceLock};

use ferry_core::BlobStore;
use libfuzzer_sys::fuzz_target;

/// Inputs between two clearings of the store (every input stores its files).
const CLEAR_EVERY: u32 = 500;

struct Env {
    runtime: tokio::runtime::Runtime,
    dir: std::path::PathBuf,
    store: Mutex<(BlobStore, u32)>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // On tmpfs where there is one: every stored blob is synced.
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let dir = std::path::PathBuf::from(base).join(format!("ferry-fuzz-exports-{}", std::process::id()));
        let store = runtime.block_on(BlobStore::open(&dir)).expect("blob store");
        Env {
            runtime,
            dir,
            store: Mutex::new((store, 0)),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    let Ok(mut slot) = env.store.lock() else { return };
    slot.1 += 1;
    if slot.1 % CLEAR_EVERY == 0 {
        let _ = std::fs::remove_dir_all(&env.dir);
        slot.0 = env.runtime.block_on(BlobStore::open(&env.dir)).expect("blob store");
    }
    let _ = env
        .runtime
        .block_on(ferry_backends::docker::fuzzing::read_export(data, &slot.0));
});
