//! How much memory this machine has, to refuse impossible allocations before making them.

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Physical memory in bytes (`usize::MAX` where it cannot be read). Read once.
pub fn physical_bytes() -> usize {
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(read_physical_bytes)
}

/// How far `bytes` exceeds this machine's memory ("X GiB, more than this machine's Y GiB
/// of memory"), or `None` when it fits. Checked before allocating: an overcommitting OS
/// would grant an impossible request and kill the process when the memory is touched.
pub fn exceeds_physical(bytes: u128) -> Option<String> {
    let physical = physical_bytes();
    let gib = |b: f64| b / (1u64 << 30) as f64;
    (bytes > physical as u128).then(|| {
        format!(
            "{:.3} GiB, more than this machine's {:.3} GiB of memory",
            gib(bytes as f64),
            gib(physical as f64)
        )
    })
}

/// Resize `buffer` to `len` zeroed values, a kernel's scratch for `what`: a size beyond
/// this machine's memory, or one the allocator refuses (an address-space limit), is an
/// [`Error::ScratchTooLarge`] (Python `MemoryError`) before anything is allocated, where
/// `Vec::resize` would abort the process.
pub fn resize_scratch<T: Copy + Default>(
    buffer: &mut Vec<T>,
    len: usize,
    what: &'static str,
) -> Result<()> {
    if len > buffer.capacity() {
        let bytes = len as u128 * std::mem::size_of::<T>() as u128;
        let refused = |detail: String| Error::ScratchTooLarge { what, detail };
        if let Some(excess) = exceeds_physical(bytes) {
            return Err(refused(excess));
        }
        buffer
            .try_reserve_exact(len - buffer.len())
            .map_err(|e| refused(format!("of {bytes} bytes refused by the system ({e})")))?;
    }
    buffer.resize(len, T::default());
    Ok(())
}

#[cfg(unix)]
fn read_physical_bytes() -> usize {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || page_size <= 0 {
        return usize::MAX;
    }
    (pages as usize).saturating_mul(page_size as usize)
}

#[cfg(not(unix))]
fn read_physical_bytes() -> usize {
    usize::MAX
}

#[cfg(test)]
mod tests {
    #[test]
    fn physical_memory_is_plausible() {
        let bytes = super::physical_bytes();
        assert!(bytes >= 64 << 20, "{bytes} bytes");
    }

    #[test]
    fn only_more_than_physical_memory_exceeds_it() {
        let bytes = super::physical_bytes() as u128;
        assert_eq!(super::exceeds_physical(bytes), None);
        assert!(super::exceeds_physical(bytes + 1)
            .unwrap()
            .contains("more than this machine's"));
    }
}
