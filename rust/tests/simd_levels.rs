//! Every SIMD level the CPU has against the portable one. A binary of its own: the level is
//! process-wide, so switching it would change what kernels in other tests run.
//!
//! bnrs's own kernels (compiled once per level by `simd_dispatch!`) must be bit-identical
//! at every level. The GEMM is not: `gemm`'s kernels of each level block the product by
//! their register width (1, 8 or 16 lanes) and the scalar one multiplies and adds without
//! fusing, so the sums are rounded in a different order; they must agree within float32
//! rounding of a k-term dot product.

use std::sync::Mutex;

use bnrs::kernels::{activation, batch_norm, conv, dropout, fused, gemm, optim, pool};
use bnrs::simd::{self, Level};

/// Tests in this binary run on parallel threads; each holds this while it switches levels.
static LEVEL_LOCK: Mutex<()> = Mutex::new(());

fn values(len: usize, seed: u32) -> Vec<f32> {
    // A fixed, cheap pseudo-random sequence in [-2, 2) (no dependency on a RNG crate).
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

/// Run `f` at every SIMD level the CPU has, the portable one first; say which are skipped.
fn at_each_level<T>(what: &str, mut f: impl FnMut() -> T) -> Vec<(Level, T)> {
    let _guard = LEVEL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let before = simd::level();
    let mut results = Vec::new();
    for level in Level::ALL {
        if !level.is_available() {
            eprintln!("{what}: skipped {}: this CPU lacks it", level.name());
            continue;
        }
        assert_eq!(simd::set_level(level), (level, None));
        results.push((level, f()));
    }
    simd::set_level(before);
    results
}

/// Outputs of the kernels written with `simd_dispatch!` (and the AVX2 intrinsics of
/// dropout, which serve the AVX-512 level too).
fn own_kernels() -> Vec<(&'static str, Vec<f32>)> {
    let x = values(10_007, 1);
    let gy = values(10_007, 2);
    let mut out = Vec::new();
    for (name, act) in [
        ("relu", activation::Activation::Relu),
        ("leaky_relu", activation::Activation::LeakyRelu(0.1)),
        ("sigmoid", activation::Activation::Sigmoid),
        ("tanh", activation::Activation::Tanh),
    ] {
        let mut y = vec![0.0; x.len()];
        activation::forward(act, &x, &mut y).unwrap();
        let mut gx = vec![0.0; x.len()];
        activation::backward(act, &gy, &y, &mut gx).unwrap();
        out.push((name, y));
        out.push((name, gx));
    }

    let shape = [7, 5, 11, 13];
    let len: usize = shape.iter().product();
    let (x, gy) = (values(len, 3), values(len, 4));
    let (gamma, beta) = (values(5, 5), values(5, 6));
    let p = batch_norm::BatchNormParams::new(&shape, 1e-5).unwrap();
    let (mut y, mut mean, mut invstd) = (vec![0.0; len], vec![0.0; 5], vec![0.0; 5]);
    let (mut running_mean, mut running_var) = (vec![0.0; 5], vec![1.0; 5]);
    let running = batch_norm::RunningStats {
        mean: &mut running_mean,
        var: &mut running_var,
        momentum: 0.1,
    };
    batch_norm::forward_train(
        &p,
        &x,
        Some(&gamma),
        Some(&beta),
        Some(running),
        &mut y,
        &mut mean,
        &mut invstd,
    )
    .unwrap();
    let (mut gx, mut ggamma, mut gbeta) = (vec![0.0; len], vec![0.0; 5], vec![0.0; 5]);
    batch_norm::backward(
        &p,
        &gy,
        &x,
        Some(&gamma),
        &mean,
        &invstd,
        true,
        &mut gx,
        Some(&mut ggamma),
        Some(&mut gbeta),
    )
    .unwrap();
    out.extend([
        ("batch_norm", y),
        ("batch_norm mean", mean),
        ("batch_norm invstd", invstd),
        ("batch_norm running_var", running_var),
        ("batch_norm grad_input", gx),
        ("batch_norm grad_weight", ggamma),
        ("batch_norm grad_bias", gbeta),
    ]);

    let pool = pool::Pool2dParams::new(&shape, (3, 3), (2, 2), (1, 1)).unwrap();
    let [n, c, h, w] = pool.output_shape();
    let mut pooled = vec![0.0; n * c * h * w];
    pool::avg_forward(&pool, &x, false, &mut pooled).unwrap();
    let mut grad_pooled = vec![0.0; len];
    pool::avg_backward(&pool, &pooled, false, &mut grad_pooled).unwrap();
    out.extend([("avg_pool", pooled), ("avg_pool grad", grad_pooled)]);

    // The fused training block: (leaky) ReLU and max pool run by their own AVX-512
    // kernels (odd planes; rows of more than one 16-window step), the rest portable.
    for (block_shape, act, pool, p_drop) in [
        (
            shape,
            activation::Activation::Relu,
            fused::Pool2x2::Max,
            0.0,
        ),
        (
            shape,
            activation::Activation::LeakyRelu(0.1),
            fused::Pool2x2::Max,
            0.25,
        ),
        (
            [2, 3, 9, 36],
            activation::Activation::Relu,
            fused::Pool2x2::Max,
            0.25,
        ),
        (
            shape,
            activation::Activation::Tanh,
            fused::Pool2x2::Avg,
            0.25,
        ),
    ] {
        let block_len: usize = block_shape.iter().product();
        let c = block_shape[1];
        let (bx, gamma, beta) = (values(block_len, 13), values(c, 14), values(c, 15));
        let dropout = (p_drop > 0.0).then_some(fused::DropoutSpec {
            p: p_drop,
            seed: 5,
            channel_wise: false,
        });
        let p =
            fused::BnBlockParams::new(&block_shape, 1e-5, Some(act), Some(pool), dropout).unwrap();
        let out_len: usize = p.output_shape(&block_shape).iter().product();
        let (mut y, mut mean, mut invstd) = (vec![0.0; out_len], vec![0.0; c], vec![0.0; c]);
        fused::forward_train(
            &p,
            &bx,
            Some(&gamma),
            Some(&beta),
            None,
            &mut y,
            &mut mean,
            &mut invstd,
            None,
        )
        .unwrap();
        let gy = values(out_len, 16);
        let (mut gx, mut ggamma, mut gbeta) = (vec![0.0; block_len], vec![0.0; c], vec![0.0; c]);
        fused::backward(
            &p,
            &gy,
            &bx,
            Some(&gamma),
            Some(&beta),
            &mean,
            &invstd,
            &mut gx,
            Some(&mut ggamma),
            Some(&mut gbeta),
            None,
        )
        .unwrap();
        // Again with the pooling windows' codes from the forward to the backward.
        let mut codes = vec![0u8; out_len];
        let mut y_codes = vec![0.0; out_len];
        fused::forward_train(
            &p,
            &bx,
            Some(&gamma),
            Some(&beta),
            None,
            &mut y_codes,
            &mut mean,
            &mut invstd,
            Some(&mut codes),
        )
        .unwrap();
        let mut gx_codes = vec![0.0; block_len];
        fused::backward(
            &p,
            &gy,
            &bx,
            Some(&gamma),
            Some(&beta),
            &mean,
            &invstd,
            &mut gx_codes,
            None,
            None,
            Some(&codes),
        )
        .unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&y_codes),
            bits(&y),
            "bn block with codes: {block_shape:?}"
        );
        assert_eq!(
            bits(&gx_codes),
            bits(&gx),
            "bn block from codes: {block_shape:?}"
        );
        out.extend([
            ("bn block", y),
            ("bn block grad_input", gx),
            ("bn block grad_weight", ggamma),
            ("bn block grad_bias", gbeta),
            ("bn block with codes", y_codes),
            ("bn block grad_input from codes", gx_codes),
        ]);
    }

    let mut dropped = vec![0.0; len];
    dropout::forward(&x, 0.3, 17, 13, &mut dropped).unwrap();
    out.push(("dropout", dropped));

    let (mut param, mut exp_avg, mut exp_avg_sq) = (x.clone(), gy.clone(), vec![0.5; len]);
    let adam = optim::AdamConfig {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        decoupled: true,
    };
    optim::adam_step(&mut param, &gy, &mut exp_avg, &mut exp_avg_sq, 3, adam).unwrap();
    out.extend([("adam", param), ("adam exp_avg_sq", exp_avg_sq)]);

    // Depthwise convolution, multiplier 2: stride 1 (contiguous rows) and 2 (strided).
    for stride in [1, 2] {
        let weight = values(10 * 9, 10);
        let p = conv::Conv2dParams::grouped(
            &shape,
            &[10, 1, 3, 3],
            (stride, stride),
            (1, 1),
            (1, 1),
            5,
        )
        .unwrap();
        let mut y = vec![0.0; p.output_shape().iter().product()];
        conv::forward(&p, &x, &weight, Some(&values(10, 11)), &mut y).unwrap();
        let gy = values(y.len(), 12);
        let (mut gx, mut gw, mut gb) = (vec![0.0; len], vec![0.0; weight.len()], vec![0.0; 10]);
        conv::backward(&p, &gy, &x, &weight, Some(&mut gx), &mut gw, Some(&mut gb)).unwrap();
        out.extend([
            ("depthwise conv", y),
            ("depthwise conv grad_input", gx),
            ("depthwise conv grad_weight", gw),
        ]);
    }
    out
}

/// Every named output of `got` (at `level`) has the bits of the same output of `want`.
fn assert_same_bits(level: Level, got: &[(&str, Vec<f32>)], want: &[(&str, Vec<f32>)]) {
    for ((name, got), (_, want)) in got.iter().zip(want) {
        let differing = got
            .iter()
            .zip(want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differing,
            0,
            "{name} at {}: {differing} values differ",
            level.name()
        );
    }
}

#[test]
fn own_kernels_are_bit_identical_at_every_level() {
    let runs = at_each_level("own kernels", own_kernels);
    let (_, portable) = &runs[0];
    for (level, outputs) in &runs[1..] {
        assert_same_bits(*level, outputs, portable);
    }
}

/// Outputs of the stride-1 convolutions both FMA levels run by the direct kernels (a tile
/// per level, the same sums): LeNet's two layers, plain, with the fused ReLU and pool, and
/// chained; odd sizes and channel counts off the vectors; the input gradient (the
/// forward of the transposed convolution); the weight gradient of LeNet's second layer.
/// (Where the GEMM sums a pixel in one depth block, it gives these bits too.)
fn direct_convolutions() -> Vec<(&'static str, Vec<f32>)> {
    let mut out = Vec::new();
    for (input, first_weight, second_weight) in [
        ([3, 1, 28, 28], [16, 1, 3, 3], [32, 16, 3, 3]),
        ([2, 3, 19, 23], [20, 3, 3, 3], [17, 20, 3, 3]),
        // Sums of 1800 products: beyond the GEMM's depth block, whose bits would differ.
        ([1, 200, 9, 11], [40, 200, 3, 3], [24, 40, 3, 3]),
    ] {
        let p1 = conv::Conv2dParams::new(&input, &first_weight, (1, 1), (1, 1), (1, 1)).unwrap();
        let between = [input[0], first_weight[0], p1.out_h / 2, p1.out_w / 2];
        let p2 = conv::Conv2dParams::new(&between, &second_weight, (1, 1), (1, 1), (1, 1)).unwrap();
        let x = values(input.iter().product(), 20);
        let (w1, w2) = (
            values(first_weight.iter().product(), 21),
            values(second_weight.iter().product(), 22),
        );
        let (b1, b2) = (values(first_weight[0], 23), values(second_weight[0], 24));
        let x2 = values(between.iter().product(), 25);
        let relu = conv::Epilogue {
            activation: Some(activation::Activation::Relu),
        };
        for (name, p, x, w, b) in [("first", &p1, &x, &w1, &b1), ("second", &p2, &x2, &w2, &b2)] {
            let mut y = vec![0.0; p.output_shape().iter().product()];
            conv::forward_fused(p, x, w, Some(b), relu, &mut y).unwrap();
            let mut pooled = vec![0.0; y.len() / p.out_h / p.out_w * (p.out_h / 2) * (p.out_w / 2)];
            conv::forward_fused_pooled(p, x, w, Some(b), relu, conv::Pool2x2::Max, &mut pooled)
                .unwrap();
            let gy = values(y.len(), 26);
            let (mut gx, mut gw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
            conv::backward(p, &gy, x, w, Some(&mut gx), &mut gw, None).unwrap();
            out.extend([(name, y), (name, pooled), (name, gx)]);
            // The weight gradient by the direct kernel (from 14×14 outputs, beyond the
            // small-K first layers); elsewhere by the GEMM, whose bits differ by level.
            if p.out_h * p.out_w >= 14 * 14 && p.in_channels * 9 > 32 {
                out.push((name, gw));
            }
        }
        let block = |params, weight, bias| conv::PooledConv {
            params,
            weight,
            bias: Some(bias),
            epilogue: relu,
            pool: conv::Pool2x2::Avg,
        };
        let (one, two) = (block(p1, &w1[..], &b1[..]), block(p2, &w2[..], &b2[..]));
        let mut chained = vec![0.0; two.output_shape().iter().product()];
        conv::forward_fused_pooled_chain(&one, &two, &x, &mut chained).unwrap();
        out.push(("chain", chained));
    }
    out
}

#[test]
fn direct_convolutions_are_bit_identical_at_the_fma_levels() {
    let runs = at_each_level("direct convolutions", direct_convolutions);
    let mut fma = runs.iter().filter(|(level, _)| *level != Level::Scalar);
    let Some((_, first)) = fma.next() else {
        return;
    };
    for (level, outputs) in fma {
        assert_same_bits(*level, outputs, first);
    }
}

/// (m, n, k, accumulate, transposed lhs): conv-like and linear-like shapes, edges that
/// are not multiples of any register block, and the tiny products `gemm` treats apart.
const PRODUCTS: [(usize, usize, usize, bool, bool); 6] = [
    (64, 196, 144, false, false),
    (32, 100, 576, true, false),
    (17, 33, 1568, false, true),
    (3, 5, 7, true, true),
    (1, 128, 300, false, false),
    (64, 1, 9, false, true),
];

fn product(m: usize, n: usize, k: usize, accumulate: bool, lhs_transposed: bool) -> Vec<f32> {
    let (a, b) = (values(m * k, 7), values(k * n, 8));
    let mut dst = values(m * n, 9);
    let lhs = if lhs_transposed {
        gemm::MatRef::transposed(&a, m)
    } else {
        gemm::MatRef::rows(&a, k)
    };
    gemm::sgemm(
        m,
        n,
        k,
        &mut dst,
        n,
        accumulate,
        lhs,
        gemm::MatRef::rows(&b, n),
        &bnrs::parallel::StopToken::default(),
    );
    dst
}

#[test]
fn gemm_agrees_with_the_portable_level_within_rounding() {
    for (m, n, k, accumulate, lhs_transposed) in PRODUCTS {
        let runs = at_each_level("gemm", || product(m, n, k, accumulate, lhs_transposed));
        let (_, portable) = &runs[0];
        // Each output sums k products of values below 2 in magnitude (plus dst): two
        // orders of summation differ by at most about 2·k·eps·Σ|terms| <= 2·k·eps·(4k + 2).
        let bound = 2.0 * k as f32 * f32::EPSILON * (4.0 * k as f32 + 2.0);
        for (level, got) in &runs[1..] {
            for (i, (a, b)) in got.iter().zip(portable).enumerate() {
                assert!(
                    (a - b).abs() <= bound,
                    "{m}x{n}x{k} at {}: element {i}: {a} vs portable {b}",
                    level.name()
                );
            }
        }
    }
}

#[test]
fn gemm_at_the_widest_level_is_what_the_gemm_crate_computes() {
    // bnrs calls the kernels of its level itself; at the widest level that must be the
    // very code (and bits) `gemm::gemm`'s own dispatch runs.
    let widest = simd::widest_available();
    for (m, n, k, accumulate, lhs_transposed) in PRODUCTS {
        let ours = at_each_level("gemm crate", || {
            product(m, n, k, accumulate, lhs_transposed)
        })
        .into_iter()
        .find(|(level, _)| *level == widest)
        .expect("the widest level runs")
        .1;
        let (a, b) = (values(m * k, 7), values(k * n, 8));
        let mut theirs = values(m * n, 9);
        let (lhs_cs, lhs_rs) = if lhs_transposed { (m, 1) } else { (1, k) };
        // SAFETY: a is m×k with the strides above, b k×n row-major, theirs m×n row-major.
        unsafe {
            ::gemm::gemm(
                m,
                n,
                k,
                theirs.as_mut_ptr(),
                1,
                n as isize,
                accumulate,
                a.as_ptr(),
                lhs_cs as isize,
                lhs_rs as isize,
                b.as_ptr(),
                1,
                n as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                ::gemm::Parallelism::None,
            );
        }
        let differing = ours
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differing, 0, "{m}x{n}x{k}: {differing} values differ");
    }
}

#[test]
fn a_missing_level_falls_back_to_the_widest_with_a_message() {
    let _guard = LEVEL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let before = simd::level();
    for level in Level::ALL {
        let (used, message) = simd::set_level(level);
        if level.is_available() {
            assert_eq!((used, message), (level, None));
        } else {
            assert_eq!(used, simd::widest_available());
            assert!(message.expect("a message").contains(level.name()));
        }
        assert_eq!(simd::level(), used);
    }
    simd::set_level(before);
}

#[test]
fn fma_peak_runs_at_each_level() {
    // Which loop runs is read off the level (peak.rs); the rates themselves depend on
    // the machine and its load, so only their sanity is checked here.
    let peaks = at_each_level("fma peak", || bnrs::kernels::peak::fma_gflops(0.05));
    for (level, gflops) in &peaks {
        assert!(
            gflops.is_finite() && *gflops > 0.0,
            "{}: {gflops}",
            level.name()
        );
    }
}
