//! Run-time choice between the AVX2+FMA code path and the portable one.
//!
//! Kernels write their hot loops once, in a form the compiler vectorises, inside
//! [`simd_dispatch!`]; the macro compiles the body twice (with and without
//! `avx2,fma` enabled) and picks one per call. Loops keep a fixed association order
//! (explicit lane accumulators, separate multiply and add), so both paths give
//! bit-identical results. `BNRS_SIMD=0` in the environment, or [`set_enabled`]`(false)`,
//! forces the portable path.

use std::sync::atomic::{AtomicU8, Ordering};

const UNKNOWN: u8 = 0;
const AVX2: u8 = 1;
const SCALAR: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

fn detect() -> u8 {
    let disabled = std::env::var("BNRS_SIMD").is_ok_and(|v| v.trim() == "0");
    if !disabled && cpu_has_avx2_fma() {
        AVX2
    } else {
        SCALAR
    }
}

/// Whether this CPU can run the AVX2+FMA path.
pub fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX2+FMA path is used now.
#[inline]
pub fn use_avx2() -> bool {
    match STATE.load(Ordering::Relaxed) {
        AVX2 => true,
        SCALAR => false,
        _ => {
            let state = detect();
            STATE.store(state, Ordering::Relaxed);
            state == AVX2
        }
    }
}

/// Enable (if the CPU supports it) or disable the AVX2+FMA path.
pub fn set_enabled(enabled: bool) {
    let state = if enabled && cpu_has_avx2_fma() {
        AVX2
    } else {
        SCALAR
    };
    STATE.store(state, Ordering::Relaxed);
}

/// Name of the code path in use: `"avx2"` or `"scalar"`.
pub fn backend() -> &'static str {
    if use_avx2() {
        "avx2"
    } else {
        "scalar"
    }
}

/// Define a function whose body is compiled for AVX2+FMA and for the portable target,
/// choosing one at run time. Arguments must be plain (no generics in the signature).
#[macro_export]
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            {
                if $crate::simd::use_avx2() {
                    // SAFETY: use_avx2() is true only when the CPU has AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
