//! Run-time choice of the instruction set the training kernels' inner loops are compiled for.
//!
//! The crate is built for the baseline x86-64 target (SSE2), where the kernels' loops vectorise
//! to 128-bit registers without fused multiply-adds. Each kernel body is written once, generic
//! over [`Kernel::run`]'s `FMA` flag and marked `#[inline(always)]`, and [`dispatch`] runs it
//! inside a function compiled for AVX2 + FMA (or AVX-512) when the CPU has them, so that the
//! same loops become 256-bit (512-bit) fused multiply-adds. The level is detected once;
//! `NSTREAM_CPU_LEVEL=portable|avx2|avx512`, the variable nstream-kernels reads too, caps it (to
//! compare, or to reproduce the results of a CPU without the wider units).
#![expect(unsafe_code, reason = "calls into #[target_feature] functions after detecting the features at run time")]

use std::sync::OnceLock;

/// The instruction sets a kernel can run with, from the least to the most capable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    /// The target's own (SSE2 on x86-64): no fused multiply-add.
    Baseline,
    /// AVX2 and FMA (Intel since Haswell, AMD since Zen 1).
    Avx2,
    /// AVX-512 F (with AVX2 and FMA).
    Avx512,
}

impl Level {
    /// The best level this CPU supports, capped by `NSTREAM_CPU_LEVEL` (detected once).
    pub(crate) fn detected() -> Self {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let supported = Self::supported();
            match std::env::var("NSTREAM_CPU_LEVEL").ok().as_deref().map(str::trim) {
                None | Some("") => supported,
                Some(text) => match Self::parse(text) {
                    Some(cap) => cap.min(supported),
                    None => {
                        tracing::warn!(
                            value = text,
                            "NSTREAM_CPU_LEVEL: expected portable, avx2 or avx512; using what the CPU supports"
                        );
                        supported
                    }
                },
            }
        })
    }

    fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "portable" | "baseline" => Some(Self::Baseline),
            "avx2" => Some(Self::Avx2),
            "avx512" | "avx-512" => Some(Self::Avx512),
            _ => None,
        }
    }

    /// Every level this CPU can run (the tests compare them).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        let supported = Self::supported();
        [Self::Baseline, Self::Avx2, Self::Avx512].into_iter().filter(|level| *level <= supported).collect()
    }

    fn supported() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
            if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        Self::Baseline
    }
}

/// A kernel body: `run` must be `#[inline(always)]`, and so must everything it calls that should
/// be compiled for the dispatched instruction set. `FMA`: the body may use `mul_add` (a single
/// instruction only where the CPU has FMA; a slow library call otherwise).
pub(crate) trait Kernel {
    /// What the kernel returns.
    type Output;

    /// The body.
    fn run<const FMA: bool>(self) -> Self::Output;
}

/// Runs `kernel` compiled for `level` (which must not exceed what the CPU supports: levels come
/// from [`Level::detected`] or [`Level::available`]).
#[inline]
pub(crate) fn dispatch<K: Kernel>(level: Level, kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        match level.min(Level::supported()) {
            // SAFETY: `supported()` found AVX-512 F, AVX2 and FMA on this CPU.
            Level::Avx512 => return unsafe { run_avx512(kernel) },
            // SAFETY: `supported()` found AVX2 and FMA on this CPU.
            Level::Avx2 => return unsafe { run_avx2(kernel) },
            Level::Baseline => {}
        }
    }
    let _ = level;
    kernel.run::<false>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_avx2<K: Kernel>(kernel: K) -> K::Output {
    kernel.run::<true>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn run_avx512<K: Kernel>(kernel: K) -> K::Output {
    kernel.run::<true>()
}
