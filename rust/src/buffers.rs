//! Reused memory for large kernel outputs.
//!
//! A training step or an inference pass allocates the same output sizes again and again.
//! Fresh large allocations come from the OS as untouched pages, and the first write to
//! each 4 KiB page costs a page fault (about 2 µs on the machines we measure, as long as
//! the memory-bound kernels themselves). Blocks returned here are kept, most recent
//! last, up to [`cache_limit`] bytes, and handed out again for a request of exactly the
//! same size, whose pages are then already mapped.

use std::alloc::{alloc, dealloc, Layout};
use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

/// Alignment of every block (a cache line; enough for any SIMD load).
const ALIGN: usize = 64;

/// Requests below this size are not worth caching (the system allocator keeps them).
pub const MIN_CACHED_BYTES: usize = 256 * 1024;

/// A block of uninitialised memory, `bytes` long, aligned to 64 bytes.
pub struct Block {
    ptr: NonNull<u8>,
    bytes: usize,
}

// SAFETY: a Block owns its memory exclusively, like a Box<[u8]>.
unsafe impl Send for Block {}
// SAFETY: &Block gives no access to the memory; only its owner writes through `ptr`.
unsafe impl Sync for Block {}

impl Block {
    fn layout(bytes: usize) -> Option<Layout> {
        Layout::from_size_align(bytes.max(1), ALIGN).ok()
    }

    /// A new block from the system allocator, or `None` if it refuses (never an abort).
    fn allocate(bytes: usize) -> Option<Block> {
        let layout = Self::layout(bytes)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc(layout) })?;
        Some(Block { ptr, bytes })
    }

    /// The first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether it is empty (never: blocks hold at least one byte).
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        let layout = Self::layout(self.bytes).expect("the layout it was allocated with");
        // SAFETY: allocated by `alloc` with this layout, and owned by this Block.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

pub(crate) struct Cache {
    blocks: VecDeque<Block>,
    bytes: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    blocks: VecDeque::new(),
    bytes: 0,
});

fn cache() -> MutexGuard<'static, Cache> {
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most bytes kept for reuse: an eighth of physical memory, at most 1 GiB.
pub fn cache_limit() -> usize {
    (crate::memory::physical_bytes() / 8).min(1 << 30)
}

/// A block of exactly `bytes` bytes, reused if one was returned, else newly allocated;
/// `None` if the system cannot provide it. Its contents are unspecified.
pub fn take(bytes: usize) -> Option<Block> {
    let reused = {
        let mut cache = cache();
        let found = cache.blocks.iter().rposition(|b| b.bytes == bytes);
        found
            .and_then(|i| cache.blocks.remove(i))
            .inspect(|b| cache.bytes -= b.bytes)
    };
    reused.or_else(|| Block::allocate(bytes))
}

/// Return a block for reuse; the oldest blocks are freed beyond [`cache_limit`].
pub fn give(block: Block) {
    let limit = cache_limit();
    let mut evicted = Vec::new();
    {
        let mut cache = cache();
        if block.bytes > limit {
            evicted.push(block);
        } else {
            while cache.bytes + block.bytes > limit {
                let old = cache
                    .blocks
                    .pop_front()
                    .expect("cached bytes are in blocks");
                cache.bytes -= old.bytes;
                evicted.push(old);
            }
            cache.bytes += block.bytes;
            cache.blocks.push_back(block);
        }
    }
    drop(evicted); // freed outside the lock
}

/// Free every cached block; returns the bytes freed.
pub fn release() -> usize {
    let blocks = {
        let mut cache = cache();
        cache.bytes = 0;
        std::mem::take(&mut cache.blocks)
    };
    blocks.iter().map(Block::len).sum()
}

/// Bytes currently cached.
pub fn cached_bytes() -> usize {
    cache().bytes
}

/// Hold the cache's lock across `fork` (see [`crate::parallel::prepare_for_fork`]).
pub(crate) fn lock_for_fork() -> MutexGuard<'static, Cache> {
    cache()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returned_block_is_reused_for_the_same_size_only() {
        let size = MIN_CACHED_BYTES + 4096 * 7;
        let block = take(size).expect("memory");
        assert_eq!(block.len(), size);
        assert_eq!(block.as_ptr() as usize % ALIGN, 0);
        let address = block.as_ptr();
        give(block);
        let other = take(size + 64).expect("memory");
        assert_ne!(other.as_ptr(), address);
        let again = take(size).expect("memory");
        assert_eq!(again.as_ptr(), address);
        give(other);
        give(again);
        assert!(cached_bytes() >= 2 * size);
        assert!(release() >= 2 * size);
    }

    #[test]
    fn an_impossible_size_is_refused_not_aborted() {
        assert!(take(usize::MAX - 4096).is_none());
    }
}
