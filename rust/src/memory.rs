//! How much memory this machine has, to refuse impossible allocations before making them.

use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::parallel::StopToken;

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
    reserve_scratch(buffer, len, what)?;
    buffer.resize(len, T::default());
    Ok(())
}

/// Values written per piece by [`grow_scratch_until`] (4 MiB).
const GROW_PIECE_BYTES: usize = 1 << 22;

/// Grow `buffer` to at least `len` values as [`resize_scratch`] does (a buffer already
/// that long is left as it is), writing the new zeros a piece at a time and giving up
/// between pieces once `stop` is set: `Ok(false)`, the buffer part grown (the next call
/// goes on from there). For the large buffers a long call makes on its own thread: the
/// first touch of fresh memory is slow on a virtual machine (a 512 MiB array took 2.6 s
/// to fill the first time, 0.03 s the next, AMD EPYC KVM guest), and written in one go
/// it kept a training step from seeing Ctrl-C for over a second.
pub fn grow_scratch_until<T: Copy + Default>(
    buffer: &mut Vec<T>,
    len: usize,
    what: &'static str,
    stop: &StopToken,
) -> Result<bool> {
    if buffer.len() >= len {
        return Ok(true);
    }
    reserve_scratch(buffer, len, what)?;
    let piece = (GROW_PIECE_BYTES / std::mem::size_of::<T>().max(1)).max(1);
    while buffer.len() < len {
        if stop.is_set() {
            return Ok(false);
        }
        let next = len.min(buffer.len() + piece);
        buffer.resize(next, T::default());
    }
    Ok(true)
}

/// Reserve room for `len` values in `buffer` (see [`resize_scratch`]).
fn reserve_scratch<T>(buffer: &mut Vec<T>, len: usize, what: &'static str) -> Result<()> {
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
    use super::{grow_scratch_until, GROW_PIECE_BYTES};
    use crate::parallel::StopToken;

    #[test]
    fn growing_scratch_keeps_its_values_and_stops_between_pieces() {
        let piece = GROW_PIECE_BYTES / 4;
        let mut buffer = vec![7.0f32; 3];
        let never = StopToken::default();
        assert!(grow_scratch_until(&mut buffer, 2 * piece + 5, "a test", &never).unwrap());
        assert_eq!(buffer.len(), 2 * piece + 5);
        assert_eq!(&buffer[..4], &[7.0, 7.0, 7.0, 0.0]);
        assert!(buffer[3..].iter().all(|&v| v == 0.0));
        // Long enough already: left as it is, however long.
        assert!(grow_scratch_until(&mut buffer, 10, "a test", &never).unwrap());
        assert_eq!(buffer.len(), 2 * piece + 5);
        // Asked to stop: nothing written, and the next call goes on from there.
        let mut buffer = vec![7.0f32; 3];
        let stop = StopToken::already_set();
        assert!(!grow_scratch_until(&mut buffer, 3 * piece, "a test", &stop).unwrap());
        assert_eq!(buffer, [7.0; 3]);
        assert!(grow_scratch_until(&mut buffer, 3 * piece, "a test", &never).unwrap());
        assert_eq!(buffer.len(), 3 * piece);
        // A size beyond memory is refused before anything is written, stop or not.
        let mut empty: Vec<f32> = Vec::new();
        assert!(grow_scratch_until(&mut empty, usize::MAX / 8, "a test", &stop).is_err());
        assert!(empty.is_empty());
    }

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
