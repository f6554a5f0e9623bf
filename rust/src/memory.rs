//! How much memory this machine has, to refuse impossible allocations before making them.

use std::sync::OnceLock;

/// Physical memory in bytes (`usize::MAX` where it cannot be read). Read once.
pub fn physical_bytes() -> usize {
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(read_physical_bytes)
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
}
