//! The non-matmul operations of the language-model path, in the arithmetic of llama.cpp's
//! CPU backend (the evaluation that made the reference logits): its SIMD `expf`, SiLU,
//! softmax and the f16 attention products of its tinyBLAS tiles.
//!
//! Every operation is defined per row on 16 lanes, so its result does not depend on the
//! batch, the thread count or how a prompt is split: a dot product of f16 values takes
//! lane `i` = elements `i, i+16, i+32, …` accumulated by `fma` in order, then the lanes are
//! folded in halves (`i + 8`, then `i + 4`, `i + 2`, `i + 1`: GCC's
//! `_mm512_reduce_add_ps`). The scalar code here is the reference; the x86 builds compile
//! the same code with FMA (and AVX-512) enabled, which gives the same bits since every
//! `mul_add` is a fused multiply-add on every level.

use half::f16;

/// Lanes of the canonical reductions.
pub const LANES: usize = 16;

/// Fold sixteen lanes in halves (GCC's `_mm512_reduce_add_ps`).
#[inline(always)]
pub fn reduce16(a: &[f32; LANES]) -> f32 {
    let s: [f32; 8] = std::array::from_fn(|i| a[i + 8] + a[i]);
    let t: [f32; 4] = std::array::from_fn(|i| s[i + 4] + s[i]);
    (t[0] + t[2]) + (t[1] + t[3])
}

/// `e^x` as llama.cpp's AVX-512 `ggml_v_expf` computes each lane (a degree-5 polynomial on
/// `x − n·ln 2`, then `scalef` by `n`; 0 below and ∞ above the range).
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let c = f32::from_bits;
    let r = c(0x4b40_0000);
    let z = x.mul_add(c(0x3fb8_aa3b), r);
    let n = z - r;
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6).mul_add(b, 1.0));
    // scalef: j · 2^n rounded once (exact in f64, one rounding to f32). NaN stays NaN.
    let pow2 = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    ((j as f64) * pow2) as f32
}

/// `gate = silu(gate) · up` as `ggml_vec_swiglu_f32`: `x / (1 + e^(0 − x)) · g`.
#[inline(always)]
fn swiglu_ref(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + expf(0.0 - *g)) * u;
    }
}

/// One attention head's view of a sequence's cache.
#[derive(Clone, Copy, Debug)]
pub struct Head<'a> {
    /// Keys: rows of `stride` values, one per position.
    pub k: &'a [f16],
    /// Values, laid out as `k`.
    pub v: &'a [f16],
    /// Values per cached position.
    pub stride: usize,
    /// Where this head's keys and values start in a row.
    pub off: usize,
    /// Positions attended to: `0..n`.
    pub n: usize,
    /// Score scale (`1/√head_dim`).
    pub scale: f32,
}

/// Attention of one query head over positions `0..n` of a cache, as llama.cpp evaluates a
/// prompt: scores `reduce16(fma(k, f16(q)))·scale`; softmax with [`expf`] over chunks of
/// 16 positions summed in f64 (each chunk folded by [`reduce16`]) and scaled by
/// `f32(1/sum)`; the probabilities rounded to f16; `out[d] = reduce16` of the `fma`
/// chains of `v[j][d]·p[j]` over chunks of 16 positions. `k` and `v` hold rows of `stride`
/// values; this head's are at `off..off + q.len()` (see [`Head`]).
#[inline(always)]
fn attend_ref(q: &[f32], head: &Head, out: &mut [f32], scratch: &mut Vec<f32>) {
    let Head {
        k,
        v,
        stride,
        off,
        n,
        scale,
    } = *head;
    let hd = q.len();
    let chunks = n.div_ceil(LANES);
    let mut qh = [0f32; 256];
    let qc = hd.div_ceil(LANES);
    for (d, &x) in q.iter().enumerate() {
        qh[d] = f16::from_f32(x).to_f32();
    }
    scratch.clear();
    scratch.resize(chunks * LANES, f32::NEG_INFINITY);
    let s = &mut scratch[..];
    for (j, sj) in s.iter_mut().enumerate().take(n) {
        let kr = &k[j * stride + off..][..hd];
        let mut acc = [0f32; LANES];
        for c in 0..qc {
            for (i, a) in acc.iter_mut().enumerate() {
                let d = c * LANES + i;
                if d < hd {
                    *a = kr[d].to_f32().mul_add(qh[d], *a);
                }
            }
        }
        *sj = reduce16(&acc) * scale;
    }
    let max = s[..n].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0f64;
    for ch in s.chunks_exact_mut(LANES) {
        let mut val = [0f32; LANES];
        for (o, &x) in val.iter_mut().zip(ch.iter()) {
            *o = expf(x - max);
        }
        ch.copy_from_slice(&val);
        sum += reduce16(&val) as f64;
    }
    let inv = (1.0 / sum) as f32;
    for p in s.iter_mut() {
        *p = f16::from_f32(*p * inv).to_f32();
    }
    for (d, o) in out.iter_mut().enumerate() {
        let mut acc = [0f32; LANES];
        for c in 0..chunks {
            for (i, a) in acc.iter_mut().enumerate() {
                let j = c * LANES + i;
                if j < n {
                    *a = v[j * stride + off + d].to_f32().mul_add(s[j], *a);
                }
            }
        }
        *o = reduce16(&acc);
    }
}

/// See [`swiglu_ref`]; compiled with FMA (and AVX-512 where the CPU has it).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::native::kernels::{Isa, isa};
        match isa() {
            // SAFETY: isa() reports AVX-512 only when the CPU has AVX-512 F (and FMA).
            Isa::Avx512 | Isa::Avx512Vnni => return unsafe { x86::swiglu_avx512(gate, up) },
            // SAFETY: isa() reports AVX2 only when the CPU has AVX2 and FMA.
            Isa::Avx2 => return unsafe { x86::swiglu_avx2(gate, up) },
            _ => {}
        }
    }
    swiglu_ref(gate, up)
}

/// See [`attend_ref`]; compiled with FMA (and AVX-512 where the CPU has it).
pub fn attend(q: &[f32], head: &Head, out: &mut [f32], scratch: &mut Vec<f32>) {
    let Head {
        k,
        v,
        stride,
        off,
        n,
        ..
    } = *head;
    assert!(
        q.len() <= 256 && out.len() == q.len(),
        "heads are at most 256 wide"
    );
    assert!(
        n == 0 || (k.len() >= (n - 1) * stride + off + q.len() && v.len() == k.len()),
        "the cache holds fewer positions than asked for"
    );
    #[cfg(target_arch = "x86_64")]
    {
        use crate::native::kernels::{Isa, isa};
        match isa() {
            // SAFETY: as in `swiglu`.
            Isa::Avx512 | Isa::Avx512Vnni => {
                return unsafe { x86::attend_avx512(q, head, out, scratch) };
            }
            // SAFETY: as in `swiglu`.
            Isa::Avx2 => {
                return unsafe { x86::attend_avx2(q, head, out, scratch) };
            }
            _ => {}
        }
    }
    attend_ref(q, head, out, scratch)
}

/// The reference code compiled for x86 levels (same operations, hardware FMA).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::Head;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn swiglu_avx2(gate: &mut [f32], up: &[f32]) {
        super::swiglu_ref(gate, up)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend_avx2(
        q: &[f32],
        head: &Head,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        super::attend_ref(q, head, out, scratch)
    }

    /// [`super::expf`] on sixteen lanes: llama.cpp's `ggml_v_expf` itself.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    pub(super) fn expf16(x: __m512) -> __m512 {
        let c = |b: u32| _mm512_set1_ps(f32::from_bits(b));
        let r = c(0x4b40_0000);
        let z = _mm512_fmadd_ps(x, c(0x3fb8_aa3b), r);
        let n = _mm512_sub_ps(z, r);
        let b = _mm512_fnmadd_ps(n, c(0x35bf_be8e), _mm512_fnmadd_ps(n, c(0x3f31_7200), x));
        let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
        let u = _mm512_mul_ps(b, b);
        let j = _mm512_fmadd_ps(
            _mm512_fmadd_ps(_mm512_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)), u, {
                _mm512_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb))
            }),
            u,
            _mm512_fmadd_ps(c(0x3f7f_fff6), b, _mm512_set1_ps(1.0)),
        );
        let res = _mm512_scalef_ps(j, n);
        if big == 0 {
            return res;
        }
        let neg = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, _mm512_setzero_ps());
        let alt = _mm512_mask_blend_ps(neg, _mm512_set1_ps(f32::INFINITY), _mm512_setzero_ps());
        _mm512_mask_blend_ps(big, res, alt)
    }

    /// [`super::reduce16`] of one register.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    fn reduce(v: __m512) -> f32 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let t3 = _mm256_add_ps(hi, _mm512_castps512_ps256(v));
        let t6 = _mm_add_ps(_mm256_extractf128_ps::<1>(t3), _mm256_castps256_ps128(t3));
        let t8 = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
        _mm_cvtss_f32(_mm_add_ss(t8, _mm_movehdup_ps(t8)))
    }

    /// Sixteen f16 values at `p` as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    unsafe fn load16(p: *const f16) -> __m512 {
        // SAFETY: the caller passes sixteen readable f16 values.
        _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p as *const __m256i) })
    }

    /// See [`super::swiglu_ref`]; sixteen lanes at a time (the tail in the reference code).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    pub(super) unsafe fn swiglu_avx512(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let whole = n / 16 * 16;
        let one = _mm512_set1_ps(1.0);
        for i in (0..whole).step_by(16) {
            // SAFETY: i + 16 <= n for both slices.
            unsafe {
                let x = _mm512_loadu_ps(gate.as_ptr().add(i));
                let g = _mm512_loadu_ps(up.as_ptr().add(i));
                let e = expf16(_mm512_sub_ps(_mm512_setzero_ps(), x));
                let y = _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), g);
                _mm512_storeu_ps(gate.as_mut_ptr().add(i), y);
            }
        }
        super::swiglu_ref(&mut gate[whole..n], &up[whole..n]);
    }

    /// See [`super::attend_ref`]: one register per 16 head dimensions and per lane of 16
    /// positions, so each output's sixteen `fma` chains and their fold are the reference's.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    pub(super) unsafe fn attend_avx512(
        q: &[f32],
        head: &Head,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let Head {
            k,
            v,
            stride,
            off,
            n,
            scale,
        } = *head;
        let hd = q.len();
        if !hd.is_multiple_of(16) || n == 0 {
            return super::attend_ref(q, head, out, scratch);
        }
        let qc = hd / 16;
        let mut qh = [_mm512_setzero_ps(); 16];
        for (c, qv) in qh.iter_mut().enumerate().take(qc) {
            // SAFETY: c * 16 + 16 <= hd = q.len().
            let x = unsafe { _mm512_loadu_ps(q.as_ptr().add(c * 16)) };
            *qv = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
        }
        let chunks = n.div_ceil(16);
        scratch.clear();
        scratch.resize(chunks * 16, f32::NEG_INFINITY);
        let s = &mut scratch[..];
        let kp = k.as_ptr();
        for (j, sj) in s.iter_mut().enumerate().take(n) {
            let mut acc = _mm512_setzero_ps();
            for (c, qv) in qh.iter().enumerate().take(qc) {
                // SAFETY: position j < n is in the cache (checked by `attend`).
                let kv = unsafe { load16(kp.add(j * stride + off + c * 16)) };
                acc = _mm512_fmadd_ps(kv, *qv, acc);
            }
            *sj = reduce(acc) * scale;
        }
        let max = s[..n].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let vmax = _mm512_set1_ps(max);
        let mut sum = 0f64;
        for ch in s.chunks_exact_mut(16) {
            // SAFETY: ch holds sixteen floats.
            unsafe {
                let e = expf16(_mm512_sub_ps(_mm512_loadu_ps(ch.as_ptr()), vmax));
                _mm512_storeu_ps(ch.as_mut_ptr(), e);
                sum += reduce(e) as f64;
            }
        }
        let inv = _mm512_set1_ps((1.0 / sum) as f32);
        for ch in s.chunks_exact_mut(16) {
            // SAFETY: ch holds sixteen floats.
            unsafe {
                let p = _mm512_mul_ps(_mm512_loadu_ps(ch.as_ptr()), inv);
                let p = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(p));
                _mm512_storeu_ps(ch.as_mut_ptr(), p);
            }
        }
        let vp = v.as_ptr();
        for c in 0..qc {
            let mut acc = [_mm512_setzero_ps(); 16];
            for (j, &p) in s.iter().enumerate().take(n) {
                // SAFETY: position j < n is in the cache.
                let vv = unsafe { load16(vp.add(j * stride + off + c * 16)) };
                acc[j % 16] = _mm512_fmadd_ps(vv, _mm512_set1_ps(p), acc[j % 16]);
            }
            let t: [__m512; 8] = std::array::from_fn(|i| _mm512_add_ps(acc[i + 8], acc[i]));
            let t: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(t[i + 4], t[i]));
            let r = _mm512_add_ps(_mm512_add_ps(t[0], t[2]), _mm512_add_ps(t[1], t[3]));
            // SAFETY: c * 16 + 16 <= hd = out.len().
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(c * 16), r) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn expf_is_close_to_exp_and_saturates_like_llama_cpp() {
        for i in -2000..2000 {
            let x = i as f32 * 0.0437;
            let (got, want) = (expf(x), (x as f64).exp());
            if want > 1e-30 && want < 1e30 {
                assert!(
                    ((got as f64 - want) / want).abs() < 3e-7,
                    "{x}: {got} vs {want}"
                );
            }
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(200.0), f32::INFINITY);
        assert!(expf(f32::NAN).is_nan());
    }

    #[test]
    fn attention_weights_sum_to_one_and_attend_to_the_right_positions() {
        // One position: the output is that position's value (through f16 probabilities 1.0).
        let q = [0.5f32; 16];
        let k: Vec<f16> = (0..32).map(|i| f16::from_f32(i as f32 * 0.01)).collect();
        let v: Vec<f16> = (0..32).map(|i| f16::from_f32(i as f32)).collect();
        let mut out = [0f32; 16];
        let head = |n| Head {
            k: &k,
            v: &v,
            stride: 16,
            off: 0,
            n,
            scale: 0.25,
        };
        attend(&q, &head(1), &mut out, &mut Vec::new());
        assert_eq!(out.to_vec(), (0..16).map(|i| i as f32).collect::<Vec<_>>());
        // Equal scores: the mean of the values.
        let k = vec![f16::from_f32(1.0); 32];
        let head = |n| Head {
            k: &k,
            v: &v,
            stride: 16,
            off: 0,
            n,
            scale: 0.25,
        };
        attend(&q, &head(2), &mut out, &mut Vec::new());
        assert_eq!(
            out.to_vec(),
            (0..16).map(|i| i as f32 + 8.0).collect::<Vec<_>>()
        );
    }

    proptest! {
        #[test]
        fn simd_expf_is_bit_identical_to_the_reference(
            xs in proptest::collection::vec(prop_oneof![
                -100f32..100f32, -200f32..200f32, Just(f32::NEG_INFINITY), Just(f32::INFINITY),
                Just(f32::NAN), Just(0.0f32), Just(-0.0f32), -1e-30f32..1e-30f32,
            ], 16),
        ) {
            #[cfg(target_arch = "x86_64")]
            if crate::native::kernels::detect() >= crate::native::kernels::Isa::Avx512 {
                use std::arch::x86_64::*;
                let mut got = [0f32; 16];
                // SAFETY: the CPU has AVX-512 F (and AVX2, FMA, F16C); 16 floats each side.
                unsafe {
                    let v = x86::expf16(_mm512_loadu_ps(xs.as_ptr()));
                    _mm512_storeu_ps(got.as_mut_ptr(), v);
                }
                for (x, g) in xs.iter().zip(got) {
                    prop_assert!(same(g, expf(*x)), "x {x}: {g} vs {}", expf(*x));
                }
            }
        }

        #[test]
        fn simd_swiglu_is_bit_identical_to_the_reference(
            g in proptest::collection::vec(-30f32..30f32, 0..70), seed in any::<u32>(),
        ) {
            let up: Vec<f32> = g.iter().enumerate().map(|(i, _)| ((i as u32 ^ seed) % 97) as f32 * 0.1 - 4.0).collect();
            let mut want = g.clone();
            swiglu_ref(&mut want, &up);
            let mut got = g.clone();
            swiglu(&mut got, &up);
            for (a, b) in got.iter().zip(&want) {
                prop_assert!(same(*a, *b), "{a} vs {b}");
            }
        }

        #[test]
        fn simd_attention_is_bit_identical_to_the_reference(
            n in 1usize..70, hi in 0usize..3, hd in prop_oneof![Just(16usize), Just(64), Just(24)],
            qs in proptest::collection::vec(-4f32..4f32, 64),
            cache in proptest::collection::vec(-3f32..3f32, 70 * 192),
            scale in prop_oneof![Just(0.125f32), 0.01f32..1.0],
        ) {
            let stride = 3 * hd;
            let k: Vec<f16> = cache[..n * stride].iter().map(|&x| f16::from_f32(x)).collect();
            let v: Vec<f16> = cache[..n * stride].iter().rev().map(|&x| f16::from_f32(x * 0.5)).collect();
            let q = &qs[..hd];
            let head = Head { k: &k, v: &v, stride, off: hi * hd, n, scale };
            let mut want = vec![0f32; hd];
            attend_ref(q, &head, &mut want, &mut Vec::new());
            let mut got = vec![0f32; hd];
            attend(q, &head, &mut got, &mut Vec::new());
            let mut outs = vec![got];
            #[cfg(target_arch = "x86_64")]
            {
                use crate::native::kernels::{Isa, detect};
                if detect() >= Isa::Avx2 {
                    let mut o = vec![0f32; hd];
                    // SAFETY: the CPU has AVX2, FMA and F16C; shapes as `attend` checks.
                    unsafe { x86::attend_avx2(q, &head, &mut o, &mut Vec::new()) };
                    outs.push(o);
                }
                if detect() >= Isa::Avx512 {
                    let mut o = vec![0f32; hd];
                    // SAFETY: the CPU has AVX-512 F besides AVX2; shapes as above.
                    unsafe { x86::attend_avx512(q, &head, &mut o, &mut Vec::new()) };
                    outs.push(o);
                }
            }
            for o in &outs {
                for (a, b) in o.iter().zip(&want) {
                    prop_assert!(same(*a, *b), "{a} vs {b}");
                }
            }
        }
    }
}
