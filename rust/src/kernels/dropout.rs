//! Inverted dropout with a counter-based generator.
//!
//! The keep decision of unit i (an element, or a whole feature map for channel-wise
//! dropout) is word `i % 4` of Philox4x32-10 (Salmon et al., SC'11; the generator PyTorch
//! uses on CUDA) at counter `i / 4` under key `seed`: it depends on (seed, i) alone, so
//! masks are the same at any thread count and the backward regenerates them from the seed.

use rayon::prelude::*;

use crate::error::{check_len, Error, Result};
use crate::parallel::ELEMENTWISE_CHUNK;
use crate::simd_dispatch;

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds.
#[inline(always)]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for _ in 0..10 {
        let p0 = u64::from(PHILOX_M0) * u64::from(c[0]);
        let p1 = u64::from(PHILOX_M1) * u64::from(c[2]);
        c = [
            ((p1 >> 32) as u32) ^ c[1] ^ k[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ c[3] ^ k[1],
            p0 as u32,
        ];
        k = [k[0].wrapping_add(PHILOX_W0), k[1].wrapping_add(PHILOX_W1)];
    }
    c
}

/// Keep threshold: unit i is kept iff its 32-bit word is below it.
fn keep_threshold(p: f32) -> u64 {
    (((1.0 - f64::from(p)) * 4_294_967_296.0).round() as u64).min(1 << 32)
}

fn check_p(p: f32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid("p", p, "a dropout probability in [0, 1)"));
    }
    Ok(())
}

#[inline(always)]
fn block_words(seed: u64, block: u64) -> [u32; 4] {
    philox4x32_10([block as u32, (block >> 32) as u32, 0, 0], [seed as u32, (seed >> 32) as u32])
}

simd_dispatch! {
    /// Keep decisions (1 or 0) of units `first..first + keep.len()`, `first` a multiple of 4.
    fn fill_mask(keep: &mut [u8], first: u64, seed: u64, threshold: u64) {
        let mut blocks = keep.chunks_mut(4);
        let mut block = first / 4;
        for chunk in &mut blocks {
            let words = block_words(seed, block);
            for (k, w) in chunk.iter_mut().zip(words) {
                *k = u8::from(u64::from(w) < threshold);
            }
            block += 1;
        }
    }
}

simd_dispatch! {
    /// out[i] = x[i]·scale where the unit of element i is kept, else 0.
    fn apply_mask(x: &[f32], out: &mut [f32], keep: &[u8], unit: usize, scale: f32) {
        for ((o, xs), &k) in out.chunks_mut(unit).zip(x.chunks(unit)).zip(keep) {
            let factor = if k != 0 { scale } else { 0.0 };
            for (ov, &xv) in o.iter_mut().zip(xs) {
                *ov = xv * factor;
            }
        }
    }
}

/// Dropout of `input` into `output`: units of `unit` consecutive elements (1 for element
/// dropout, H·W for channel-wise dropout) are kept with probability 1 - p and scaled by
/// 1/(1-p). The backward is the same call on the output gradient with the same seed.
pub fn forward(input: &[f32], p: f32, seed: u64, unit: usize, output: &mut [f32]) -> Result<()> {
    check_p(p)?;
    check_len("output", output.len(), input.len())?;
    if unit == 0 || input.len() % unit != 0 {
        return Err(Error::invalid("input", format!("{} elements", input.len()),
                                  format!("a whole number of units of {unit} elements")));
    }
    let threshold = keep_threshold(p);
    let scale = (1.0 / (1.0 - f64::from(p))) as f32;
    // Chunks hold a whole number of units and a multiple of 4 units (one Philox block).
    let units_per_chunk = (ELEMENTWISE_CHUNK / unit).max(1).next_multiple_of(4);
    output
        .par_chunks_mut(units_per_chunk * unit)
        .zip(input.par_chunks(units_per_chunk * unit))
        .enumerate()
        .for_each(|(i, (out, x))| {
            let mut keep = vec![0u8; x.len() / unit];
            fill_mask(&mut keep, (i * units_per_chunk) as u64, seed, threshold);
            apply_mask(x, out, &keep, unit, scale);
        });
    Ok(())
}

/// The keep decisions of units `0..keep.len()` (1 = kept), as [`forward`] draws them.
pub fn mask(p: f32, seed: u64, keep: &mut [u8]) -> Result<()> {
    check_p(p)?;
    fill_mask(keep, 0, seed, keep_threshold(p));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answers() {
        // Known-answer vectors of the Random123 distribution (kat_vectors, philox4x32_10).
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn mask_matches_forward_and_keeps_about_one_minus_p() {
        let n = 100_003;
        let x = vec![1.0f32; n];
        let mut y = vec![0.0f32; n];
        forward(&x, 0.3, 42, 1, &mut y).unwrap();
        let mut keep = vec![0u8; n];
        mask(0.3, 42, &mut keep).unwrap();
        let scale = (1.0 / 0.7f64) as f32;
        for (v, k) in y.iter().zip(&keep) {
            assert_eq!(*v, if *k == 1 { scale } else { 0.0 });
        }
        let kept = keep.iter().filter(|&&k| k == 1).count() as f64 / n as f64;
        assert!((kept - 0.7).abs() < 0.01, "kept fraction {kept}");
    }
}
