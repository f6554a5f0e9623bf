//! Single-threaded SGEMM through the `gemm` crate, behind a bounds-checked interface.
//!
//! Callers parallelise over images or row blocks themselves, with a split fixed by the
//! problem size, so results do not depend on the thread count.

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
    fn check(&self, rows: usize, cols: usize, what: &str) {
        let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
        assert!(last < self.data.len(), "gemm: {what} view out of bounds");
    }
}

/// `dst = (accumulate ? dst : 0) + a · b`, with `dst` row-major m×n (leading dim `ld_dst`),
/// `a` m×k and `b` k×n.
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
    // SAFETY: every index the product touches was bounds-checked above; dst does not
    // alias a or b (it is a distinct &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld_dst as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
