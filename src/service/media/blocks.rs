//! Fixed-size blocks that carry file bodies between sockets and disk. Uploads fill one block
//! at a time and downloads send blocks read from disk; both draw from one small pool, so a
//! burst of transfers reuses the same memory instead of leaving the allocator with blocks of
//! every size the burst happened to need.

use std::{io, os::unix::fs::FileExt, sync::Mutex};

use bytes::Bytes;
use futures_util::Stream;

/// Bytes in one block: large enough for few system calls, small enough to keep many
/// transfers in flight.
pub const SIZE: usize = 256 * 1024;

/// Idle blocks kept for reuse (8 MiB); more are freed.
const KEPT: usize = 32;

/// Idle blocks waiting for reuse.
struct Pool {
    idle: Mutex<Vec<Box<[u8]>>>,
}

impl Pool {
    const fn new() -> Self {
        Self { idle: Mutex::new(Vec::new()) }
    }

    fn take(&self) -> Box<[u8]> {
        let reused = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        reused.unwrap_or_else(|| vec![0; SIZE].into_boxed_slice())
    }

    fn give(&self, block: Box<[u8]>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if block.len() == SIZE && idle.len() < KEPT {
            idle.push(block);
        }
    }
}

/// The process's one pool.
static POOL: Pool = Pool::new();

/// A block of [`SIZE`] bytes, from the pool when one is idle.
pub fn take() -> Box<[u8]> {
    POOL.take()
}

/// Hands a block back for reuse.
pub fn give(block: Box<[u8]>) {
    POOL.give(block);
}

/// The first `len` bytes of a block, as a body chunk; the block returns to the pool once the
/// chunk has been sent and dropped.
pub struct Filled {
    block: Box<[u8]>,
    len: usize,
}

impl Filled {
    /// The first `len` bytes of `block` (all of it if `len` is larger).
    pub fn new(block: Box<[u8]>, len: usize) -> Self {
        let len = len.min(block.len());
        Self { block, len }
    }
}

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        &self.block[..self.len]
    }
}

impl Drop for Filled {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.block));
    }
}

/// `len` bytes of `file` from `offset`, one block per chunk, each read off the async workers.
/// A file shorter than promised ends the stream with an error rather than short data.
pub fn read(
    file: std::fs::File,
    offset: u64,
    len: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let file = std::sync::Arc::new(file);
    futures_util::stream::try_unfold((offset, len), move |(offset, left)| {
        let file = file.clone();
        async move {
            if left == 0 {
                return Ok(None);
            }
            let want = left.min(SIZE as u64) as usize;
            let (block, read) = tokio::task::spawn_blocking(move || {
                let mut block = take();
                let read = file.read_exact_at(&mut block[..want], offset);
                (block, read)
            })
            .await
            .map_err(io::Error::other)?;
            let chunk = Filled::new(block, want);
            read?;
            Ok(Some((Bytes::from_owner(chunk), (offset + want as u64, left - want as u64))))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_reused_and_the_pool_stays_bounded() {
        // A pool of the test's own, so that other tests' transfers cannot take its blocks.
        let pool = Pool::new();
        let first = pool.take();
        let address = first.as_ptr();
        pool.give(first);
        let again = pool.take();
        assert_eq!(again.as_ptr(), address, "an idle block is handed out again");
        pool.give(again);
        let taken: Vec<_> = (0..KEPT + 8).map(|_| pool.take()).collect();
        assert!(taken.iter().all(|b| b.len() == SIZE));
        for block in taken {
            pool.give(block);
        }
        assert_eq!(pool.idle.lock().unwrap().len(), KEPT);
        pool.give(vec![0; 3].into_boxed_slice());
        assert_eq!(pool.idle.lock().unwrap().len(), KEPT, "odd sizes are not kept");

        let chunk = Filled::new(take(), 10);
        assert_eq!(chunk.as_ref().len(), 10);
    }

    #[tokio::test]
    async fn reads_ranges_in_blocks_and_fails_on_a_short_file() {
        use futures_util::TryStreamExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("body");
        let body: Vec<u8> = (0..SIZE * 2 + 100).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &body).unwrap();
        let open = || std::fs::File::open(&path).unwrap();

        let chunks: Vec<Bytes> = read(open(), 0, body.len() as u64).try_collect().await.unwrap();
        assert_eq!(chunks.iter().map(Bytes::len).collect::<Vec<_>>(), [SIZE, SIZE, 100]);
        assert_eq!(chunks.concat(), body);

        let middle: Vec<Bytes> = read(open(), 10, 20).try_collect().await.unwrap();
        assert_eq!(middle.concat(), body[10..30]);

        let beyond: io::Result<Vec<Bytes>> =
            read(open(), body.len() as u64 - 5, 10).try_collect().await;
        assert_eq!(beyond.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
