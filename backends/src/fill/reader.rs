//! A client's reading of a fill: from the temp file as it grows (or the newest bytes still in
//! memory), never the last byte before the blob verified.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::{Fill, Stage};

/// One client's view of a fill.
pub(super) struct Reader {
    pub(super) fill: Arc<Fill>,
    pub(super) file: Arc<std::fs::File>,
    pub(super) pos: u64,
    pub(super) end: u64,
    pub(super) progress: watch::Receiver<Stage>,
    pub(super) failed: bool,
    /// Its chunks are held against the read-ahead budget.
    pub(super) account: ferry_core::chunks::Account,
}

impl Reader {
    /// The next chunk, waiting for the fill to write it; `None` at the end.
    pub(super) async fn next(&mut self) -> Option<io::Result<Bytes>> {
        if self.failed || self.pos >= self.end {
            return None;
        }
        loop {
            let available = match &*self.progress.borrow_and_update() {
                Stage::Verified | Stage::Done => self.fill.size,
                // The last byte waits for the digest check.
                Stage::Writing(n) => (*n).min(self.fill.size.saturating_sub(1)),
                Stage::Failed(e) => {
                    self.failed = true;
                    return Some(Err(io::Error::other(format!("fetch from the origin failed: {e}"))));
                }
            };
            if available > self.pos {
                let grant = self.account.grant_next().await;
                let want = (available.min(self.end) - self.pos).min(grant.size() as u64);
                if let Some(bytes) = self.fill.recent_at(self.pos, want) {
                    self.pos += bytes.len() as u64;
                    self.fill.reached(self.pos);
                    return Some(Ok(grant.hold(bytes)));
                }
                let (file, pos) = (self.file.clone(), self.pos);
                let place = ferry_core::chunks::run_place().await;
                let read = tokio::task::spawn_blocking(move || {
                    use std::io::{Read, Seek};
                    let _place = place;
                    // The file is this reader's own: seek, then read_to_end, which fills spare
                    // capacity without zeroing it first.
                    let mut file = &*file;
                    file.seek(io::SeekFrom::Start(pos))?;
                    let mut buf = Vec::with_capacity(want as usize);
                    file.take(want).read_to_end(&mut buf)?;
                    Ok::<_, io::Error>(buf)
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
                return match read {
                    Ok(buf) if buf.is_empty() => {
                        self.failed = true;
                        Some(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "blob being fetched is short",
                        )))
                    }
                    Ok(buf) => {
                        self.pos += buf.len() as u64;
                        self.fill.reached(self.pos);
                        Some(Ok(grant.hold(Bytes::from(buf))))
                    }
                    Err(e) => {
                        self.failed = true;
                        Some(Err(e))
                    }
                };
            }
            if self.progress.changed().await.is_err() && !self.fill.ended() {
                self.failed = true;
                return Some(Err(io::Error::other("the fetch ended without an outcome")));
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.fill.reader_left();
    }
}
