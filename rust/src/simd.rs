//! Run-time choice of the SIMD level: AVX-512, AVX2+FMA or portable code.
//!
//! Kernels write their hot loops once, in a form the compiler vectorises, inside
//! [`simd_dispatch!`]; the macro compiles the body once per [`Level`] and picks one per
//! call. Loops keep a fixed association order (explicit lane accumulators, separate
//! multiply and add), so every level gives bit-identical results. The GEMM follows the
//! same level (see [`crate::kernels::gemm`]), but its blocking depends on the register
//! width, so its rounding may differ between levels.
//!
//! The level is the widest the CPU has, unless `BNRS_SIMD` (`avx512`, `avx2`, `scalar`;
//! `0` also means scalar) or [`set_level`] asks for a lower one.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

/// A SIMD code path, from the narrowest to the widest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Portable code (whatever the x86-64 baseline, SSE2, gives).
    Scalar = 1,
    /// AVX2 and FMA (x86-64-v3).
    Avx2 = 2,
    /// AVX-512 F, BW, CD, DQ, VL on top of AVX2 and FMA (x86-64-v4).
    Avx512 = 3,
}

impl Level {
    /// Every level, narrowest first.
    pub const ALL: [Level; 3] = [Level::Scalar, Level::Avx2, Level::Avx512];

    /// The name `BNRS_SIMD` and `bnrs.simd_backend()` use.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// The level a name stands for (case and surrounding blanks ignored; `0` is scalar).
    pub fn parse(name: &str) -> Option<Level> {
        match name.trim().to_ascii_lowercase().as_str() {
            "scalar" | "0" => Some(Level::Scalar),
            "avx2" => Some(Level::Avx2),
            "avx512" => Some(Level::Avx512),
            _ => None,
        }
    }

    /// Whether this CPU can run the level.
    pub fn is_available(self) -> bool {
        match self {
            Level::Scalar => true,
            Level::Avx2 => cpu_has_avx2_fma(),
            Level::Avx512 => cpu_has_avx512(),
        }
    }

    fn from_u8(value: u8) -> Option<Level> {
        Level::ALL.into_iter().find(|&l| l as u8 == value)
    }
}

/// The level in use; 0 until the first call reads `BNRS_SIMD` and the CPU.
static STATE: AtomicU8 = AtomicU8::new(0);

/// The level the first detection chose (from `BNRS_SIMD` and the CPU); 0 until then.
static INITIAL: AtomicU8 = AtomicU8::new(0);

/// Why the first detection did not give what `BNRS_SIMD` asked for, until taken.
static ENV_WARNING: Mutex<Option<String>> = Mutex::new(None);

/// The widest level this CPU can run.
pub fn widest_available() -> Level {
    Level::ALL
        .into_iter()
        .rev()
        .find(|l| l.is_available())
        .unwrap_or(Level::Scalar)
}

/// `requested` if the CPU has it, else the widest level it has and a message saying so.
pub fn resolve(requested: Level) -> (Level, Option<String>) {
    if requested.is_available() {
        return (requested, None);
    }
    let widest = widest_available();
    let message = format!(
        "this CPU has no {} (x86-64-{}); using {}",
        requested.name(),
        if requested == Level::Avx512 {
            "v4"
        } else {
            "v3"
        },
        widest.name()
    );
    (widest, Some(message))
}

/// The level `BNRS_SIMD` asks for, resolved against the CPU, and a warning when the value
/// is not a level name or the CPU lacks that level. Unset or blank: the widest level.
fn from_environment(value: Option<&str>) -> (Level, Option<String>) {
    let Some(value) = value.filter(|v| !v.trim().is_empty()) else {
        return (widest_available(), None);
    };
    match Level::parse(value) {
        Some(requested) => {
            let (level, warning) = resolve(requested);
            (level, warning.map(|w| format!("BNRS_SIMD={value}: {w}")))
        }
        None => {
            let widest = widest_available();
            let warning = format!(
                "BNRS_SIMD={value:?} is not a SIMD level (expected avx512, avx2, scalar or 0); \
                 using {}",
                widest.name()
            );
            (widest, Some(warning))
        }
    }
}

fn detect() -> Level {
    let value = std::env::var("BNRS_SIMD").ok();
    let (level, warning) = from_environment(value.as_deref());
    if warning.is_some() {
        *ENV_WARNING.lock().unwrap_or_else(|e| e.into_inner()) = warning;
    }
    INITIAL.store(level as u8, Ordering::Relaxed);
    level
}

/// The warning about `BNRS_SIMD` from the first detection, once (the Python module turns it
/// into a `RuntimeWarning` at import).
pub fn take_environment_warning() -> Option<String> {
    let _ = level();
    ENV_WARNING.lock().unwrap_or_else(|e| e.into_inner()).take()
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

/// Whether this CPU can run the AVX-512 path (x86-64-v4: the features the `gemm` crate's
/// AVX-512 kernels and [`simd_dispatch!`]'s AVX-512 bodies are compiled with).
pub fn cpu_has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cpu_has_avx2_fma()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512cd")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The level in use now.
#[inline]
pub fn level() -> Level {
    match Level::from_u8(STATE.load(Ordering::Relaxed)) {
        Some(level) => level,
        None => {
            let level = detect();
            STATE.store(level as u8, Ordering::Relaxed);
            level
        }
    }
}

/// Whether the AVX2+FMA intrinsics may run (the level is AVX2 or wider): hand-written
/// AVX2 kernels serve the AVX-512 level too.
#[inline]
pub fn use_avx2() -> bool {
    level() >= Level::Avx2
}

/// Use `requested`, or the widest level the CPU has if it lacks `requested` (with a
/// message saying so). Returns the level now in use.
pub fn set_level(requested: Level) -> (Level, Option<String>) {
    let (level, warning) = resolve(requested);
    STATE.store(level as u8, Ordering::Relaxed);
    (level, warning)
}

/// Use SIMD (`true`: the level `BNRS_SIMD` chose at start if it is not scalar, else the
/// widest the CPU has) or the portable path (`false`).
pub fn set_enabled(enabled: bool) {
    let _ = level();
    let initial = Level::from_u8(INITIAL.load(Ordering::Relaxed)).unwrap_or(Level::Scalar);
    let level = match (enabled, initial) {
        (false, _) => Level::Scalar,
        (true, Level::Scalar) => widest_available(),
        (true, initial) => initial,
    };
    STATE.store(level as u8, Ordering::Relaxed);
}

/// Name of the level in use: `"avx512"`, `"avx2"` or `"scalar"`.
pub fn backend() -> &'static str {
    level().name()
}

/// Define a function whose body is compiled for each [`Level`] (portable, AVX2+FMA,
/// AVX-512), choosing one at run time. Arguments must be plain (no generics in the
/// signature).
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
            #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512cd,avx512dq,avx512vl")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            {
                match $crate::simd::level() {
                    // SAFETY: level() is Avx512 only when the CPU has these features.
                    $crate::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: level() is Avx2 only when the CPU has AVX2 and FMA.
                    $crate::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::simd::Level::Scalar => {}
                }
            }
            body($($arg),*)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_zero_means_scalar() {
        for level in Level::ALL {
            assert_eq!(Level::parse(level.name()), Some(level));
        }
        assert_eq!(Level::parse(" AVX2 "), Some(Level::Avx2));
        assert_eq!(Level::parse("0"), Some(Level::Scalar));
        assert_eq!(Level::parse("sse"), None);
        assert_eq!(Level::parse(""), None);
    }

    #[test]
    fn environment_values() {
        let widest = widest_available();
        assert_eq!(from_environment(None), (widest, None));
        assert_eq!(from_environment(Some(" ")), (widest, None));
        assert_eq!(from_environment(Some("scalar")), (Level::Scalar, None));
        assert_eq!(from_environment(Some("0")), (Level::Scalar, None));
        let (level, warning) = from_environment(Some("avx9"));
        assert_eq!(level, widest);
        let warning = warning.expect("an invalid value warns");
        assert!(warning.contains("\"avx9\"") && warning.contains("expected avx512"));
        for requested in [Level::Avx2, Level::Avx512] {
            let (level, warning) = from_environment(Some(requested.name()));
            if requested.is_available() {
                assert_eq!((level, warning), (requested, None));
            } else {
                assert_eq!(level, widest);
                assert!(warning
                    .expect("a missing level warns")
                    .contains("this CPU has no"));
            }
        }
    }

    #[test]
    fn levels_nest() {
        assert!(Level::Scalar.is_available());
        if Level::Avx512.is_available() {
            assert!(Level::Avx2.is_available());
        }
    }
}
