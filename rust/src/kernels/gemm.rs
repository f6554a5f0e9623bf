//! Single-threaded SGEMM through the `gemm` crate, behind a bounds-checked interface.
//!
//! Callers parallelise over images or row blocks themselves, with a split fixed by the
//! problem size, so results do not depend on the thread count.
//!
//! `gemm::gemm` picks its kernels once per process from the CPU alone, so a lower
//! [`crate::simd::Level`] could not reach it. [`sgemm`] therefore calls the f32 kernels of
//! the level in use itself, exactly as `gemm`'s own dispatch does (`gemm_common`'s
//! `gemm_basic_generic` with `gemm_f32`'s micro-kernels of that level; tested bit for bit
//! against `gemm::gemm` at the widest level). Their register blocking differs between
//! levels (8 or 16 lanes), and so may their rounding.

use crate::simd::Level;
use gemm_common::simd::MixedSimd;

/// A read-only matrix view: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix with leading dimension `ld`.
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        MatRef {
            data,
            row_stride: ld,
            col_stride: 1,
        }
    }
    /// The transpose of a row-major matrix with leading dimension `ld`.
    pub fn transposed(data: &'a [f32], ld: usize) -> Self {
        MatRef {
            data,
            row_stride: 1,
            col_stride: ld,
        }
    }
    /// The same elements seen as the transposed matrix.
    fn transpose(self) -> Self {
        MatRef {
            data: self.data,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
    /// The view from element (row, col) on.
    fn offset(self, row: usize, col: usize) -> Self {
        MatRef {
            data: &self.data[row * self.row_stride + col * self.col_stride..],
            ..self
        }
    }
    fn check(&self, rows: usize, cols: usize, what: &str) {
        let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
        assert!(last < self.data.len(), "gemm: {what} view out of bounds");
    }
}

/// `dst = (accumulate ? dst : 0) + a · b`, with `dst` row-major m×n (leading dim `ld_dst`),
/// `a` m×k and `b` k×n. A product large enough to be cut into panels checks `stop` (the
/// calling kernel's token, captured before its parallel loop) between them.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ld_dst: usize,
    accumulate: bool,
    a: MatRef<'_>,
    b: MatRef<'_>,
    stop: &crate::parallel::StopToken,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(ld_dst).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        (m - 1) * ld_dst + n <= dst.len(),
        "gemm: destination out of bounds"
    );
    a.check(m, k, "lhs");
    b.check(k, n, "rhs");
    let (row_panels, col_panels) = panels(m, n, k);
    for i in 0..row_panels {
        let rows = i * m / row_panels..(i + 1) * m / row_panels;
        for j in 0..col_panels {
            let cols = j * n / col_panels..(j + 1) * n / col_panels;
            if (i, j) != (0, 0) && stop.is_set() {
                return;
            }
            product_unchecked(
                rows.len(),
                cols.len(),
                k,
                &mut dst[rows.start * ld_dst + cols.start..],
                ld_dst,
                accumulate,
                a.offset(rows.start, 0),
                b.offset(0, cols.start),
            );
        }
    }
}

/// Floating-point operations per GEMM panel: about 5-20 ms of one core, so that a stop
/// request is seen within ~0.1 s even inside one huge product (a 4096×16384 by
/// 16384×4096 linear layer's row block took 0.26-0.57 s between stop checks).
const PANEL_FLOPS: usize = 1 << 30;

/// Fewest rows or columns of a panel. Panels this long keep each piece on the path
/// `gemm` takes for the whole product (its small-matrix and matrix-vector paths start
/// at 64 and 1 rows or columns, its horizontal one at 256 elements), and its depth blocking depends on k alone, so every
/// element sums the same terms in the same order: results are bit-identical to the
/// unsplit product (tested).
const MIN_PANEL: usize = 128;

/// How many row panels and column panels split an m×n×k product: one of each unless it
/// exceeds [`PANEL_FLOPS`]; rows first (the `gemm` crate's outermost loop on a row-major
/// destination, so splitting them repacks the least).
fn panels(m: usize, n: usize, k: usize) -> (usize, usize) {
    let (mut row_panels, mut col_panels) = (1, 1);
    if k <= 2 || m.min(n) < 16 {
        return (1, 1);
    }
    let flops = |r: usize, c: usize| 2 * (m / r) * (n / c) * k;
    while flops(row_panels, col_panels) > PANEL_FLOPS {
        if m / (2 * row_panels) >= MIN_PANEL {
            row_panels *= 2;
        } else if n / (2 * col_panels) >= MIN_PANEL {
            col_panels *= 2;
        } else {
            break;
        }
    }
    (row_panels, col_panels)
}

/// [`sgemm`] of one panel, its bounds checked by the caller.
#[allow(clippy::too_many_arguments)]
fn product_unchecked(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ld_dst: usize,
    accumulate: bool,
    a: MatRef<'_>,
    b: MatRef<'_>,
) {
    // The `gemm` crate transposes the problem when dst is row-major (its micro-kernels
    // prefer column-major dst); do the same, so each level runs what `gemm::gemm` would.
    let (m, n, dst_cs, dst_rs, lhs, rhs) = if 1 < ld_dst {
        (n, m, ld_dst, 1, b.transpose(), a.transpose())
    } else {
        (m, n, 1, ld_dst, a, b)
    };
    // SAFETY: every index the product touches was bounds-checked by [`sgemm`]; dst does not
    // alias a or b (it is a distinct &mut borrow); the level's kernels run only on a CPU
    // that has its features (`simd::level()` never names a level the CPU lacks).
    unsafe {
        product_at_level(
            crate::simd::level(),
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs,
            rhs,
        )
    }
}

/// `gemm_common::gemm::gemm_basic_generic` with the micro-kernels of one level, as the
/// `gemm` crate instantiates it (`gemm_common::__inject_mod!`): `$lanes` floats a register.
macro_rules! gemm_basic {
    ($simd:expr, $lanes:literal, $($kernels:ident)::+, $m:expr, $n:expr, $k:expr, $dst:expr,
     $dst_cs:expr, $dst_rs:expr, $read_dst:expr, $lhs:expr, $rhs:expr) => {
        gemm_common::gemm::gemm_basic_generic::<
            _,
            f32,
            $lanes,
            { $($kernels)::+::MR_DIV_N * $lanes },
            { $($kernels)::+::NR },
            { $($kernels)::+::MR_DIV_N },
            { $($kernels)::+::H_M },
            { $($kernels)::+::H_N },
        >(
            $simd,
            $m,
            $n,
            $k,
            $dst,
            $dst_cs,
            $dst_rs,
            $read_dst,
            $lhs.data.as_ptr(),
            $lhs.col_stride as isize,
            $lhs.row_stride as isize,
            $rhs.data.as_ptr(),
            $rhs.col_stride as isize,
            $rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            |a, b, c| a * b + c,
            &$($kernels)::+::UKR,
            &$($kernels)::+::H_UKR,
            false,
            gemm_common::Parallelism::None,
        )
    };
}

/// `dst = (read_dst ? dst : 0) + lhs · rhs` (dst m×n with strides `dst_cs`, `dst_rs`) with
/// the `gemm` kernels of `level`.
///
/// # Safety
/// The views and dst cover every index of the product, dst aliases neither, and the CPU
/// has `level`'s features.
#[allow(clippy::too_many_arguments)]
unsafe fn product_at_level(
    level: Level,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
) {
    #[cfg(target_arch = "x86_64")]
    match level {
        Level::Avx512 => {
            let simd = <gemm_common::simd::V4 as MixedSimd<f32, f32, f32, f32>>::try_new()
                .expect("simd::level() is Avx512 only on CPUs with AVX-512");
            gemm_basic!(
                simd,
                16,
                gemm_f32::microkernel::avx512f::f32,
                m,
                n,
                k,
                dst,
                dst_cs,
                dst_rs,
                read_dst,
                lhs,
                rhs
            );
            return;
        }
        Level::Avx2 => {
            let simd = <gemm_common::simd::V3 as MixedSimd<f32, f32, f32, f32>>::try_new()
                .expect("simd::level() is Avx2 only on CPUs with AVX2 and FMA");
            gemm_basic!(
                simd,
                8,
                gemm_f32::microkernel::fma::f32,
                m,
                n,
                k,
                dst,
                dst_cs,
                dst_rs,
                read_dst,
                lhs,
                rhs
            );
            return;
        }
        Level::Scalar => {}
    }
    let _ = level; // only x86-64 has levels above the portable one
    gemm_basic!(
        gemm_common::simd::Scalar,
        1,
        gemm_f32::microkernel::scalar::f32,
        m,
        n,
        k,
        dst,
        dst_cs,
        dst_rs,
        read_dst,
        lhs,
        rhs
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, salt: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(salt) >> 8) as f32 / 2e7)
            .collect()
    }

    #[test]
    fn a_product_split_into_panels_is_bit_identical_to_the_whole() {
        // Rows split (1024 → 4 × 256), then columns once rows are at their minimum.
        for (m, n, k, expected) in [(1024, 520, 2100, (4, 1)), (300, 1024, 4000, (2, 2))] {
            assert_eq!(panels(m, n, k), expected);
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            for accumulate in [false, true] {
                let start = values(m * n, 3);
                let (mut split, mut whole) = (start.clone(), start);
                let (a_view, b_view) = (MatRef::rows(&a, k), MatRef::transposed(&b, k));
                sgemm(
                    m,
                    n,
                    k,
                    &mut split,
                    n,
                    accumulate,
                    a_view,
                    b_view,
                    &crate::parallel::StopToken::default(),
                );
                product_unchecked(m, n, k, &mut whole, n, accumulate, a_view, b_view);
                assert!(split == whole, "{m}x{n}x{k} accumulate {accumulate}");
            }
        }
    }

    #[test]
    fn usual_products_are_not_split() {
        assert_eq!(panels(64, 3136, 576), (1, 1));
        assert_eq!(panels(4096, 4096, 8), (1, 1));
        assert_eq!(panels(8, 1 << 20, 1 << 12), (1, 1));
    }
}
