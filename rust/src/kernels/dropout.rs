//! Inverted dropout with a counter-based generator.
//!
//! Keep decisions come from Philox4x32-10 (Salmon et al., SC'11; the generator PyTorch
//! uses on CUDA) keyed by `seed`. Units (elements, or whole feature maps for channel-wise
//! dropout) go in groups of 32: unit `i` belongs to group `g = i / 32`; with `r = i % 32`
//! it takes word `r / 8` of the Philox block at counter `8g + r % 8`. A decision therefore
//! depends on (seed, i) alone, so masks are the same at any thread count, the backward
//! regenerates them from the seed, and eight blocks (32 with AVX-512) are computed side by
//! side in SIMD lanes.

// Lane loops index several arrays at once on purpose: that is the form LLVM vectorises.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use crate::error::{check_len, Error, Result};
use crate::parallel::{elementwise_chunk, ELEMENTWISE_CHUNK};
use crate::simd_dispatch;

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Units per group: 8 Philox blocks of 4 words.
pub const GROUP: usize = 32;
const LANES: usize = 8;

/// The words Philox works on: one block's (`u32`), or the same word of eight blocks side
/// by side (SIMD lanes), so that the rounds are written once for every width.
trait PhiloxWords: Copy {
    /// The high and low 32 bits of `multiplier · self`.
    fn mul_hi_lo(self, multiplier: u32) -> (Self, Self);
    fn xor(self, other: Self) -> Self;
    fn xor_key(self, key: u32) -> Self;
}

impl PhiloxWords for u32 {
    #[inline(always)]
    fn mul_hi_lo(self, multiplier: u32) -> (u32, u32) {
        let product = u64::from(multiplier) * u64::from(self);
        ((product >> 32) as u32, product as u32)
    }

    #[inline(always)]
    fn xor(self, other: u32) -> u32 {
        self ^ other
    }

    #[inline(always)]
    fn xor_key(self, key: u32) -> u32 {
        self ^ key
    }
}

/// Lane-wise loops, in the form LLVM vectorises.
impl PhiloxWords for [u32; LANES] {
    #[inline(always)]
    fn mul_hi_lo(self, multiplier: u32) -> (Self, Self) {
        let (mut hi, mut lo) = ([0u32; LANES], [0u32; LANES]);
        for l in 0..LANES {
            (hi[l], lo[l]) = self[l].mul_hi_lo(multiplier);
        }
        (hi, lo)
    }

    #[inline(always)]
    fn xor(self, other: Self) -> Self {
        std::array::from_fn(|l| self[l] ^ other[l])
    }

    #[inline(always)]
    fn xor_key(self, key: u32) -> Self {
        self.map(|word| word ^ key)
    }
}

/// Philox4x32-10: ten rounds on the counter `counter` with key `key`.
#[inline(always)]
fn philox_rounds<W: PhiloxWords>(counter: [W; 4], key: [u32; 2]) -> [W; 4] {
    let (mut c, mut k) = (counter, key);
    for _ in 0..10 {
        let (hi0, lo0) = c[0].mul_hi_lo(PHILOX_M0);
        let (hi1, lo1) = c[2].mul_hi_lo(PHILOX_M1);
        c = [
            hi1.xor(c[1]).xor_key(k[0]),
            lo1,
            hi0.xor(c[3]).xor_key(k[1]),
            lo0,
        ];
        k = [k[0].wrapping_add(PHILOX_W0), k[1].wrapping_add(PHILOX_W1)];
    }
    c
}

/// Philox4x32 with 10 rounds, one block.
#[inline(always)]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    philox_rounds(counter, key)
}

/// The key of the blocks of `seed`.
fn seed_key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// The 32 words of group `group`: `words[w][l]` is word `w` of block `8·group + l`,
/// the word of unit `8w + l` of the group.
#[inline(always)]
fn group_words(seed: u64, group: u64) -> [[u32; LANES]; 4] {
    let block = |l: usize| group * LANES as u64 + l as u64;
    let counter = [
        std::array::from_fn(|l| block(l) as u32),
        std::array::from_fn(|l| (block(l) >> 32) as u32),
        [0; LANES],
        [0; LANES],
    ];
    philox_rounds(counter, seed_key(seed))
}

/// Keep threshold: a unit is kept iff its word is below it. For p > 0 it is below 2^32.
fn keep_threshold(p: f32) -> u32 {
    ((1.0 - f64::from(p)) * 4_294_967_296.0)
        .round()
        .min(f64::from(u32::MAX)) as u32
}

fn check_p(p: f32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid("p", p, "a dropout probability in [0, 1)"));
    }
    Ok(())
}

/// Multipliers (`scale` if kept, else 0) of units `32·first_group..` for `factor.len()` units.
fn fill_factors(factor: &mut [f32], first_group: u64, seed: u64, threshold: u32, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() == crate::simd::Level::Avx512 {
        // SAFETY: the AVX-512 level is only on for CPUs that have AVX-512 F.
        unsafe { fill_factors_avx512(factor, first_group, seed, threshold, scale) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::use_avx2() {
        // SAFETY: the AVX2 path is only on for CPUs that have AVX2.
        unsafe { fill_factors_avx2(factor, first_group, seed, threshold, scale) };
        return;
    }
    fill_factors_portable(factor, first_group, seed, threshold, scale);
}

/// [`fill_factors`] in portable code (LLVM vectorises the lane loops only partly).
fn fill_factors_portable(
    factor: &mut [f32],
    first_group: u64,
    seed: u64,
    threshold: u32,
    scale: f32,
) {
    for (g, chunk) in factor.chunks_mut(GROUP).enumerate() {
        let words = group_words(seed, first_group + g as u64);
        let mut all = [0.0f32; GROUP];
        for w in 0..4 {
            for l in 0..LANES {
                all[w * LANES + l] = if words[w][l] < threshold { scale } else { 0.0 };
            }
        }
        chunk.copy_from_slice(&all[..chunk.len()]);
    }
}

/// The same word of eight blocks in the lanes of an AVX2 register.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx2Words(std::arch::x86_64::__m256i);

// SAFETY (every method): `Avx2Words` are only made in `fill_factors_avx2`, which runs on
// CPUs with AVX2 only, and these methods are inlined into it.
#[cfg(target_arch = "x86_64")]
impl PhiloxWords for Avx2Words {
    #[inline(always)]
    fn mul_hi_lo(self, multiplier: u32) -> (Self, Self) {
        use std::arch::x86_64::*;
        unsafe {
            let m = _mm256_set1_epi32(multiplier as i32);
            let even = _mm256_mul_epu32(m, self.0); // lanes 0, 2, 4, 6 as 64-bit products
            let odd = _mm256_mul_epu32(m, _mm256_srli_epi64::<32>(self.0)); // lanes 1, 3, 5, 7
            let lo = _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd));
            let hi = _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<32>(even), odd);
            (Avx2Words(hi), Avx2Words(lo))
        }
    }

    #[inline(always)]
    fn xor(self, other: Self) -> Self {
        unsafe { Avx2Words(std::arch::x86_64::_mm256_xor_si256(self.0, other.0)) }
    }

    #[inline(always)]
    fn xor_key(self, key: u32) -> Self {
        use std::arch::x86_64::*;
        unsafe { Avx2Words(_mm256_xor_si256(self.0, _mm256_set1_epi32(key as i32))) }
    }
}

/// [`fill_factors`] with AVX2 intrinsics: the eight Philox blocks of a group in the eight
/// lanes of four registers, the same words as [`group_words`] (tested against it).
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_factors_avx2(
    factor: &mut [f32],
    first_group: u64,
    seed: u64,
    threshold: u32,
    scale: f32,
) {
    use std::arch::x86_64::*;
    // Unsigned `word < threshold` as a signed comparison of both with the top bit flipped.
    let flip = _mm256_set1_epi32(i32::MIN);
    let limit = _mm256_xor_si256(_mm256_set1_epi32(threshold as i32), flip);
    let scale = _mm256_set1_ps(scale);
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (g, chunk) in factor.chunks_mut(GROUP).enumerate() {
        // Blocks 8·group + l: the low words of a multiple of 8 plus l never carry.
        let first_block = (first_group + g as u64) * LANES as u64;
        let counter = [
            Avx2Words(_mm256_add_epi32(
                _mm256_set1_epi32(first_block as u32 as i32),
                lanes,
            )),
            Avx2Words(_mm256_set1_epi32((first_block >> 32) as u32 as i32)),
            Avx2Words(_mm256_setzero_si256()),
            Avx2Words(_mm256_setzero_si256()),
        ];
        let words = philox_rounds(counter, seed_key(seed));
        let mut all = [0.0f32; GROUP];
        for (w, Avx2Words(words)) in words.into_iter().enumerate() {
            let keep = _mm256_cmpgt_epi32(limit, _mm256_xor_si256(words, flip));
            let f = _mm256_and_ps(_mm256_castsi256_ps(keep), scale);
            let lanes_out: &mut [f32; LANES] = (&mut all[w * LANES..(w + 1) * LANES])
                .try_into()
                .expect("eight lanes");
            // `lanes_out` is eight writable f32s; storeu needs no alignment.
            _mm256_storeu_ps(lanes_out.as_mut_ptr(), f);
        }
        chunk.copy_from_slice(&all[..chunk.len()]);
    }
}

/// The same word of 32 blocks (four groups' eight) in the lanes of two AVX-512
/// registers: two independent chains of rounds, which overlap in the pipeline (one chain's
/// rounds wait on each other's multiplies).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx512Words([std::arch::x86_64::__m512i; 2]);

// SAFETY (every method): `Avx512Words` are only made in `fill_factors_avx512`, which runs
// on CPUs with AVX-512 F only, and these methods are inlined into it.
#[cfg(target_arch = "x86_64")]
impl PhiloxWords for Avx512Words {
    #[inline(always)]
    fn mul_hi_lo(self, multiplier: u32) -> (Self, Self) {
        use std::arch::x86_64::*;
        unsafe {
            let m = _mm512_set1_epi32(multiplier as i32);
            let halves = self.0.map(|v| {
                let even = _mm512_mul_epu32(m, v); // even lanes as 64-bit products
                let odd = _mm512_mul_epu32(m, _mm512_srli_epi64::<32>(v)); // odd lanes
                let lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64::<32>(odd));
                let hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64::<32>(even), odd);
                (hi, lo)
            });
            (
                Avx512Words([halves[0].0, halves[1].0]),
                Avx512Words([halves[0].1, halves[1].1]),
            )
        }
    }

    #[inline(always)]
    fn xor(self, other: Self) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            Avx512Words([
                _mm512_xor_si512(self.0[0], other.0[0]),
                _mm512_xor_si512(self.0[1], other.0[1]),
            ])
        }
    }

    #[inline(always)]
    fn xor_key(self, key: u32) -> Self {
        use std::arch::x86_64::*;
        unsafe {
            let k = _mm512_set1_epi32(key as i32);
            Avx512Words([
                _mm512_xor_si512(self.0[0], k),
                _mm512_xor_si512(self.0[1], k),
            ])
        }
    }
}

/// Groups a step of [`fill_factors_avx512`] draws.
#[cfg(target_arch = "x86_64")]
const AVX512_GROUPS: usize = 4;

/// [`fill_factors`] with AVX-512 intrinsics: four groups at a time, the 32 Philox blocks of
/// groups g..g + 4 in the lanes of two sets of four registers (the same unit ↔ counter
/// mapping, so the same words as [`group_words`]; tested against it).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fill_factors_avx512(
    factor: &mut [f32],
    first_group: u64,
    seed: u64,
    threshold: u32,
    scale: f32,
) {
    use std::arch::x86_64::*;
    const BLOCKS: usize = AVX512_GROUPS * LANES;
    let limit = _mm512_set1_epi32(threshold as i32);
    let scale = _mm512_set1_ps(scale);
    for (step, chunk) in factor.chunks_mut(AVX512_GROUPS * GROUP).enumerate() {
        // Blocks 8·g + l of the step's groups, one a lane (the low word may carry into the
        // high one between two groups).
        let first_block = (first_group + (AVX512_GROUPS * step) as u64) * LANES as u64;
        let blocks: [u64; BLOCKS] = std::array::from_fn(|l| first_block + l as u64);
        let (low, high): ([u32; BLOCKS], [u32; BLOCKS]) =
            (blocks.map(|b| b as u32), blocks.map(|b| (b >> 32) as u32));
        // SAFETY: unaligned loads of sixteen words from 32-word arrays.
        let load = |words: &[u32; BLOCKS]| unsafe {
            Avx512Words([
                _mm512_loadu_si512(words.as_ptr().cast()),
                _mm512_loadu_si512(words.as_ptr().add(16).cast()),
            ])
        };
        let zero = Avx512Words([_mm512_setzero_si512(); 2]);
        let words = philox_rounds([load(&low), load(&high), zero, zero], seed_key(seed));
        let mut all = [0.0f32; AVX512_GROUPS * GROUP];
        for (w, Avx512Words(registers)) in words.into_iter().enumerate() {
            for (half, register) in registers.into_iter().enumerate() {
                let keep = _mm512_cmplt_epu32_mask(register, limit);
                let mut lanes = [0.0f32; 2 * LANES];
                // SAFETY: an unaligned store into a sixteen-value array.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_maskz_mov_ps(keep, scale)) };
                // Lane l of register `half` is block 16·half + l: group 2·half + l / 8,
                // whose unit 8w + l % 8 takes word w.
                for (k, group_lanes) in lanes.chunks_exact(LANES).enumerate() {
                    let at = (2 * half + k) * GROUP + w * LANES;
                    all[at..at + LANES].copy_from_slice(group_lanes);
                }
            }
        }
        chunk.copy_from_slice(&all[..chunk.len()]);
    }
}

simd_dispatch! {
    /// out = x · factor, element-wise.
    pub(crate) fn multiply(x: &[f32], factor: &[f32], out: &mut [f32]) {
        for ((o, &v), &f) in out.iter_mut().zip(x).zip(factor) {
            *o = v * f;
        }
    }
}

simd_dispatch! {
    /// out = x · factor[unit], for units of `unit` consecutive elements.
    fn multiply_units(x: &[f32], factor: &[f32], unit: usize, out: &mut [f32]) {
        for ((o, xs), &f) in out.chunks_mut(unit).zip(x.chunks(unit)).zip(factor) {
            for (ov, &xv) in o.iter_mut().zip(xs) {
                *ov = xv * f;
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
    if unit == 0 || !input.len().is_multiple_of(unit) {
        return Err(Error::invalid(
            "input",
            format!("{} elements", input.len()),
            format!("a whole number of units of {unit} elements"),
        ));
    }
    if p == 0.0 {
        output.copy_from_slice(input);
        return Ok(());
    }
    let threshold = keep_threshold(p);
    let scale = (1.0 / (1.0 - f64::from(p))) as f32;
    // Chunks hold a whole number of groups of units; a unit's decision depends on its
    // index alone, so the chunk size changes no value.
    let units_per_chunk = (elementwise_chunk(input.len()) / unit)
        .max(1)
        .next_multiple_of(GROUP);
    let stop = crate::parallel::stop_token();
    output
        .par_chunks_mut(units_per_chunk * unit)
        .zip(input.par_chunks(units_per_chunk * unit))
        .enumerate()
        .for_each_init(Vec::new, |factor, (i, (out, x))| {
            if stop.is_set() {
                return;
            }
            factor.resize(x.len() / unit, 0.0);
            let first_group = (i * units_per_chunk / GROUP) as u64;
            fill_factors(factor, first_group, seed, threshold, scale);
            if unit == 1 {
                multiply(x, factor, out);
            } else {
                multiply_units(x, factor, unit, out);
            }
        });
    Ok(())
}

/// The multipliers [`forward`] applies to units `first_unit..first_unit + factor.len()`
/// (1/(1-p) if kept, else 0), for a first unit anywhere (not only at a group's start): a
/// fused kernel applies the same mask tile by tile.
pub fn unit_factors(p: f32, seed: u64, first_unit: usize, factor: &mut [f32]) -> Result<()> {
    check_p(p)?;
    if p == 0.0 {
        factor.fill(1.0);
        return Ok(());
    }
    let threshold = keep_threshold(p);
    let scale = (1.0 / (1.0 - f64::from(p))) as f32;
    let (first_group, offset) = (first_unit / GROUP, first_unit % GROUP);
    // A short run (a fused block's plane) from one call, so that its groups are drawn
    // side by side rather than the first group alone.
    const SHORT: usize = 4 * GROUP;
    if offset != 0 && offset + factor.len() <= SHORT {
        let mut groups = [0.0f32; SHORT];
        let drawn = &mut groups[..offset + factor.len()];
        fill_factors(drawn, first_group as u64, seed, threshold, scale);
        factor.copy_from_slice(&drawn[offset..]);
        return Ok(());
    }
    let mut whole_groups = factor;
    if offset != 0 {
        let mut group = [0.0f32; GROUP];
        fill_factors(&mut group, first_group as u64, seed, threshold, scale);
        let head = (GROUP - offset).min(whole_groups.len());
        let (first, rest) = whole_groups.split_at_mut(head);
        first.copy_from_slice(&group[offset..offset + head]);
        whole_groups = rest;
    }
    let next_group = first_group + usize::from(offset != 0);
    fill_factors(whole_groups, next_group as u64, seed, threshold, scale);
    Ok(())
}

/// The keep decisions of units `0..keep.len()` (1 = kept), as [`forward`] draws them.
pub fn mask(p: f32, seed: u64, keep: &mut [u8]) -> Result<()> {
    check_p(p)?;
    if p == 0.0 {
        keep.fill(1);
        return Ok(());
    }
    // In chunks of whole groups, as `forward` draws them: the scratch stays bounded
    // (it was four bytes per unit, 8 GB for a 2 GB mask).
    let chunk = ELEMENTWISE_CHUNK.next_multiple_of(GROUP);
    let mut factor = vec![0.0f32; chunk.min(keep.len())];
    for (i, keep_chunk) in keep.chunks_mut(chunk).enumerate() {
        let factor = &mut factor[..keep_chunk.len()];
        fill_factors(
            factor,
            (i * chunk / GROUP) as u64,
            seed,
            keep_threshold(p),
            1.0,
        );
        for (k, &f) in keep_chunk.iter_mut().zip(factor.iter()) {
            *k = u8::from(f != 0.0);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answers() {
        // Known-answer vectors of the Random123 distribution (kat_vectors, philox4x32_10).
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn lane_wise_groups_match_single_blocks() {
        let seed = 0x0123_4567_89ab_cdef;
        let words = group_words(seed, 5);
        for l in 0..LANES {
            let block = 5 * LANES as u64 + l as u64;
            let single = philox4x32_10(
                [block as u32, (block >> 32) as u32, 0, 0],
                [seed as u32, (seed >> 32) as u32],
            );
            for w in 0..4 {
                assert_eq!(words[w][l], single[w]);
            }
        }
    }

    #[test]
    fn avx2_factors_match_the_portable_ones() {
        if !crate::simd::cpu_has_avx2_fma() {
            return;
        }
        for &(seed, first_group, len, p) in &[
            (0u64, 0u64, 32usize, 0.5f32),
            (0x0123_4567_89ab_cdef, 5, 1000, 0.25),
            (u64::MAX, (1u64 << 29) - 3, 77, 0.9), // blocks cross 2^32
            (7, 12, 31, 1e-6),
        ] {
            let threshold = keep_threshold(p);
            let mut portable = vec![0.0f32; len];
            fill_factors_portable(&mut portable, first_group, seed, threshold, 2.0);
            let mut avx2 = vec![0.0f32; len];
            // SAFETY: checked above that the CPU has AVX2.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                fill_factors_avx2(&mut avx2, first_group, seed, threshold, 2.0)
            };
            assert_eq!(portable, avx2, "seed {seed} group {first_group}");
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_factors_match_the_portable_ones() {
        if !crate::simd::Level::Avx512.is_available() {
            eprintln!("fill_factors_avx512: skipped, this CPU lacks AVX-512");
            return;
        }
        for &(seed, first_group, len, p) in &[
            (0u64, 0u64, 32usize, 0.5f32),
            (0x0123_4567_89ab_cdef, 5, 1000, 0.25),
            (u64::MAX, (1u64 << 29) - 3, 77, 0.9), // blocks cross 2^32
            (3, (1u64 << 29) - 1, 64, 0.5),        // between a step's groups
            (7, 12, 31, 1e-6),
            (11, 1, 65, 0.3),
            (13, 2, 129, 0.6),
        ] {
            let threshold = keep_threshold(p);
            let mut portable = vec![0.0f32; len];
            fill_factors_portable(&mut portable, first_group, seed, threshold, 2.0);
            let mut avx512 = vec![0.0f32; len];
            // SAFETY: checked above that the CPU has AVX-512.
            unsafe { fill_factors_avx512(&mut avx512, first_group, seed, threshold, 2.0) };
            assert_eq!(portable, avx512, "seed {seed} group {first_group}");
        }
    }

    #[test]
    fn unit_factors_from_any_first_unit_match_forward() {
        let n = 1000;
        let mut whole = vec![0.0f32; n];
        forward(&vec![1.0f32; n], 0.4, 9, 1, &mut whole).unwrap();
        for (first, len) in [
            (0usize, 1000usize),
            (5, 3),
            (31, 2),
            (33, 200),
            (999, 1),
            (40, 49),
            (100, 28),
        ] {
            let mut part = vec![-1.0f32; len];
            unit_factors(0.4, 9, first, &mut part).unwrap();
            assert_eq!(part, whole[first..first + len], "units {first}..+{len}");
        }
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
