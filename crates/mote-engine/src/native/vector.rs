//! Element-wise and attention kernels of the native encoder, in f32, with a scalar reference
//! and AVX2 and AVX-512 paths that perform exactly the same IEEE operations in the same
//! order per element (same polynomial, same fused multiply-adds, same rounding of `n` in
//! `exp`), so every ISA level gives the same bits. Proptests below hold each SIMD kernel to
//! its scalar reference on every level the CPU has.
//!
//! - [`exp`]: Cody–Waite reduction + degree-6 polynomial (Cephes `expf` coefficients),
//!   inputs clamped to [-87, 88] (results below `exp(-87)` flush to that value's range).
//! - [`gelu`]: `0.5·x·(1 + erf(x/√2))` with Abramowitz–Stegun 7.1.26 for erf
//!   (|error| ≤ 1.5e-7 in exact arithmetic).
//! - [`attend`]: up to four queries' scaled dot-product attention over one head: scores
//!   summed over the head dimension in order, softmax with an 8-lane canonical sum, context
//!   summed over keys in order.
//! - [`add_layer_norm`]: statistics in f64, eight partial sums in a fixed order (one 512-bit
//!   register, or two 256-bit ones), the residual added row by row.

use super::kernels::{Isa, detect, isa};

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];
const EXP_MIN: f32 = -87.0;
const EXP_MAX: f32 = 88.0;

const ERF_P: f32 = 0.327_591_1;
const ERF_A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_8,
    -1.453_152_1,
    1.061_405_4,
];

/// `exp(x)`, scalar reference (the operations of the AVX2 path, one lane).
pub fn exp_scalar(x: f32) -> f32 {
    // max/min written as the SIMD instructions behave (NaN → the bound).
    let x = if x > EXP_MIN { x } else { EXP_MIN };
    let x = if x < EXP_MAX { x } else { EXP_MAX };
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// GELU (erf form) of one value, scalar reference.
pub fn gelu_scalar(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / ERF_P.mul_add(z, 1.0);
    let mut p = ERF_A[4];
    for a in ERF_A[..4].iter().rev() {
        p = p.mul_add(t, *a);
    }
    let p = p * t;
    let e = exp_scalar(-(z * z));
    let erf = (-p).mul_add(e, 1.0);
    let erf = if x < 0.0 { -erf } else { erf };
    let h = 0.5 * x;
    h.mul_add(erf, h)
}

/// Reduce 8 lane sums in the canonical order `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`.
fn reduce8(l: &[f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// Attention of one query over one head, scalar reference.
///
/// `q`: the query (head width `hd`); `kt`: the keys transposed, `hd` rows of `stride ≥ len`
/// (columns past `len` ignored); `v`: value rows, row `j` at `v[j * v_stride..][..hd]`;
/// `scores`: scratch of at least `len.next_multiple_of(8)`; result in `out` (`hd`).
#[allow(clippy::too_many_arguments)]
pub fn attend_scalar(
    q: &[f32],
    kt: &[f32],
    stride: usize,
    len: usize,
    v: &[f32],
    v_stride: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let l8 = len.next_multiple_of(8);
    for (j, s) in scores[..len].iter_mut().enumerate() {
        let mut acc = 0f32;
        for d in 0..hd {
            acc = q[d].mul_add(kt[d * stride + j], acc);
        }
        *s = acc * scale;
    }
    let max = scores[..len]
        .iter()
        .fold(f32::NEG_INFINITY, |m, &s| if m > s { m } else { s });
    let mut lanes = [0f32; 8];
    for j in 0..l8 {
        let e = if j < len {
            exp_scalar(scores[j] - max)
        } else {
            0.0
        };
        scores[j] = e;
        lanes[j % 8] += e;
    }
    let inv = 1.0 / reduce8(&lanes);
    for (d, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for j in 0..len {
            acc = scores[j].mul_add(v[j * v_stride + d], acc);
        }
        *o = acc * inv;
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::*;

    use super::*;

    /// [`super::avx2::exp8`] sixteen lanes at a time (the same operations per lane).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    fn exp16(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN));
        let x = _mm512_min_ps(x, _mm512_set1_ps(EXP_MAX));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
        let mut p = _mm512_set1_ps(EXP_P[0]);
        for c in &EXP_P[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        _mm512_mul_ps(y, _mm512_castsi512_ps(bits))
    }

    /// GELU of sixteen values (the operations of [`super::gelu_scalar`] per lane).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    pub(in super::super) fn gelu16(x: __m512) -> __m512 {
        let sign = _mm512_set1_ps(-0.0);
        let z = _mm512_mul_ps(
            _mm512_andnot_ps(sign, x),
            _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
        );
        let one = _mm512_set1_ps(1.0);
        let t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(ERF_P), z, one));
        let mut p = _mm512_set1_ps(ERF_A[4]);
        for a in ERF_A[..4].iter().rev() {
            p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(*a));
        }
        let p = _mm512_mul_ps(p, t);
        let e = exp16(_mm512_xor_ps(_mm512_mul_ps(z, z), sign));
        let erf = _mm512_fnmadd_ps(p, e, one);
        // erf takes x's sign when x < 0 (x = -0.0 keeps +erf, as the scalar `x < 0.0`).
        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
        let erf = _mm512_mask_xor_ps(erf, neg, erf, sign);
        let h = _mm512_mul_ps(_mm512_set1_ps(0.5), x);
        _mm512_fmadd_ps(h, erf, h)
    }

    /// [`super::avx2::attend`] with 512-bit registers: scores 16 keys per register (the last
    /// 8 masked), the AVX2 path's softmax, context 16 dimensions per register; each score and
    /// each context element is the same chain of operations, so the same bits.
    /// Requires `hd % 16 == 0`, `stride ≥ len` rounded up to 8, and `scores` of `Q` such rows.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    pub fn attend<const Q: usize>(
        qs: [&[f32]; Q],
        kt: &[f32],
        stride: usize,
        len: usize,
        v: &[f32],
        v_stride: usize,
        scale: f32,
        scores: &mut [f32],
        mut outs: [&mut [f32]; Q],
    ) {
        let hd = qs[0].len();
        let l8 = len.next_multiple_of(8);
        assert!(
            len > 0 && hd.is_multiple_of(16) && stride >= l8 && kt.len() >= (hd - 1) * stride + l8
        );
        assert!(qs.iter().all(|q| q.len() == hd) && outs.iter().all(|o| o.len() == hd));
        assert!(scores.len() >= Q * l8 && v.len() >= (len - 1) * v_stride + hd);
        let scale_v = _mm512_set1_ps(scale);
        let mut j = 0;
        while j < l8 {
            match l8 - j {
                64.. => {
                    scores16::<Q, 4>(&qs, kt, stride, j, l8, scale_v, scores, 0xFFFF);
                    j += 64;
                }
                16.. => {
                    scores16::<Q, 1>(&qs, kt, stride, j, l8, scale_v, scores, 0xFFFF);
                    j += 16;
                }
                _ => {
                    scores16::<Q, 1>(&qs, kt, stride, j, l8, scale_v, scores, 0x00FF);
                    j += 8;
                }
            }
        }
        let inv = softmax_rows::<Q>(scores, l8, len).map(|i| _mm512_set1_ps(i));
        let mut d0 = 0;
        while d0 < hd {
            let n = match (hd - d0) / 16 {
                1 => 1,
                2 | 3 => 2,
                _ => 4,
            };
            match n {
                1 => context16::<Q, 1>(scores, l8, len, v, v_stride, d0, &inv, &mut outs),
                2 => context16::<Q, 2>(scores, l8, len, v, v_stride, d0, &inv, &mut outs),
                _ => context16::<Q, 4>(scores, l8, len, v, v_stride, d0, &inv, &mut outs),
            }
            d0 += 16 * n;
        }
    }

    /// [`super::avx2::softmax_rows`] sixteen scores per register: the same max, the same
    /// exponentials per lane, and the low then the high eight added to the same eight lane
    /// sums in the same order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    fn softmax_rows<const Q: usize>(scores: &mut [f32], l8: usize, len: usize) -> [f32; Q] {
        assert!(len > 0 && l8 == len.next_multiple_of(8) && scores.len() >= Q * l8);
        let mut inv = [0f32; Q];
        for (qi, inv) in inv.iter_mut().enumerate() {
            let row = &mut scores[qi * l8..][..l8];
            let ptr = row.as_mut_ptr();
            // Lanes at or past `len` are excluded from the max and zeroed after exp.
            let valid = |c: usize| -> __mmask16 {
                let n = len.saturating_sub(c * 16).min(16);
                ((1u32 << n) - 1) as u16
            };
            let chunks = l8.div_ceil(16);
            // The last chunk may be half a register (l8 is a multiple of 8 only).
            let in_row =
                |c: usize| -> __mmask16 { if c * 16 + 16 <= l8 { 0xFFFF } else { 0x00FF } };
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for c in 0..chunks {
                // SAFETY: the lanes read are below l8 == row.len().
                let v = unsafe { _mm512_maskz_loadu_ps(in_row(c), ptr.add(c * 16)) };
                m = _mm512_mask_max_ps(m, valid(c), m, v);
            }
            // max is exact, so any order gives the scalar fold's value.
            let maxv = _mm512_set1_ps(_mm512_reduce_max_ps(m));
            let mut sum = _mm256_setzero_ps();
            for c in 0..chunks {
                // SAFETY: the lanes read and written are below l8 == row.len().
                unsafe {
                    let p = ptr.add(c * 16);
                    let x = _mm512_maskz_loadu_ps(in_row(c), p);
                    let e = _mm512_maskz_mov_ps(valid(c), exp16(_mm512_sub_ps(x, maxv)));
                    _mm512_mask_storeu_ps(p, in_row(c), e);
                    sum = _mm256_add_ps(sum, _mm512_castps512_ps256(e));
                    if in_row(c) == 0xFFFF {
                        sum = _mm256_add_ps(sum, _mm512_extractf32x8_ps::<1>(e));
                    }
                }
            }
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
            *inv = 1.0 / reduce8(&lanes);
        }
        inv
    }

    /// Scores of keys `j..j + 16N` (the last register's lanes limited by `mask`) for every
    /// query, summed over the head dimension in order.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn scores16<const Q: usize, const N: usize>(
        qs: &[&[f32]; Q],
        kt: &[f32],
        stride: usize,
        j: usize,
        l8: usize,
        scale: __m512,
        scores: &mut [f32],
        mask: __mmask16,
    ) {
        let hd = qs[0].len();
        let span = 16 * (N - 1) + mask.count_ones() as usize;
        assert!(qs.iter().all(|q| q.len() == hd));
        assert!(j + span <= stride && kt.len() >= (hd - 1) * stride + j + span);
        assert!(scores.len() >= (Q - 1) * l8 + j + span && j + span <= l8);
        // Full registers but the last, which takes `mask`'s lanes.
        let lanes = |c: usize| if c + 1 == N { mask } else { 0xFFFF };
        let mut acc = [[_mm512_setzero_ps(); N]; Q];
        let qp = qs.map(|q| q.as_ptr());
        for d in 0..hd {
            let mut k = [_mm512_setzero_ps(); N];
            for (c, k) in k.iter_mut().enumerate() {
                // SAFETY: the lanes read are below d * stride + j + span <= kt.len().
                *k = unsafe {
                    _mm512_maskz_loadu_ps(lanes(c), kt.as_ptr().add(d * stride + j + 16 * c))
                };
            }
            for (q, acc) in qp.iter().zip(acc.iter_mut()) {
                // SAFETY: d < hd, the length of every query (asserted).
                let qd = _mm512_set1_ps(unsafe { *q.add(d) });
                for (a, k) in acc.iter_mut().zip(&k) {
                    *a = _mm512_fmadd_ps(qd, *k, *a);
                }
            }
        }
        for (qi, acc) in acc.iter().enumerate() {
            for (c, a) in acc.iter().enumerate() {
                // SAFETY: the lanes written are below qi * l8 + j + span <= scores.len().
                unsafe {
                    _mm512_mask_storeu_ps(
                        scores.as_mut_ptr().add(qi * l8 + j + 16 * c),
                        lanes(c),
                        _mm512_mul_ps(*a, scale),
                    )
                };
            }
        }
    }

    /// Dimensions `d0..d0 + 16N` of every query's context, summed over keys in order.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn context16<const Q: usize, const N: usize>(
        scores: &[f32],
        l8: usize,
        len: usize,
        v: &[f32],
        v_stride: usize,
        d0: usize,
        inv: &[__m512; Q],
        outs: &mut [&mut [f32]; Q],
    ) {
        assert!(scores.len() >= (Q - 1) * l8 + len);
        assert!(v.len() >= (len - 1) * v_stride + d0 + 16 * N);
        assert!(outs.iter().all(|o| o.len() >= d0 + 16 * N));
        let mut acc = [[_mm512_setzero_ps(); N]; Q];
        let sp = scores.as_ptr();
        for jj in 0..len {
            let mut vv = [_mm512_setzero_ps(); N];
            for (c, vv) in vv.iter_mut().enumerate() {
                // SAFETY: jj * v_stride + d0 + 16c + 16 <= (len-1)*v_stride + d0 + 16N <= v.len().
                *vv = unsafe { _mm512_loadu_ps(v.as_ptr().add(jj * v_stride + d0 + 16 * c)) };
            }
            for (qi, acc) in acc.iter_mut().enumerate() {
                // SAFETY: qi * l8 + jj < (Q - 1) * l8 + len <= scores.len() (asserted).
                let p = _mm512_set1_ps(unsafe { *sp.add(qi * l8 + jj) });
                for (a, vv) in acc.iter_mut().zip(&vv) {
                    *a = _mm512_fmadd_ps(p, *vv, *a);
                }
            }
        }
        for ((acc, out), inv) in acc.iter().zip(outs.iter_mut()).zip(inv) {
            for (c, a) in acc.iter().enumerate() {
                // SAFETY: d0 + 16c + 16 <= out.len() (asserted).
                unsafe {
                    _mm512_storeu_ps(out.as_mut_ptr().add(d0 + 16 * c), _mm512_mul_ps(*a, *inv))
                };
            }
        }
    }

    /// [`super::layer_norm_scalar`] with the eight f64 partial sums in one register: whole
    /// groups of eight elements in vectors, the tail in the same lanes one by one.
    #[target_feature(enable = "avx512f")]
    pub fn layer_norm(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        assert!(gamma.len() == row.len() && beta.len() == row.len());
        let width = row.len();
        let whole = width - width % 8;
        let ptr = row.as_mut_ptr();
        let load = |i: usize| {
            // SAFETY: callers pass i + 8 <= whole <= row.len().
            _mm512_cvtps_pd(unsafe { _mm256_loadu_ps(ptr.add(i)) })
        };
        let lanes = |acc: __m512d| {
            let mut s = [0f64; 8];
            // SAFETY: `s` holds eight f64.
            unsafe { _mm512_storeu_pd(s.as_mut_ptr(), acc) };
            s
        };
        let mut acc = _mm512_setzero_pd();
        for i in (0..whole).step_by(8) {
            acc = _mm512_add_pd(acc, load(i));
        }
        let mean = sum8(lanes(acc), &row[whole..], |v| v) / width as f64;
        let mean_v = _mm512_set1_pd(mean);
        let mut acc = _mm512_setzero_pd();
        for i in (0..whole).step_by(8) {
            let d = _mm512_sub_pd(load(i), mean_v);
            acc = _mm512_add_pd(acc, _mm512_mul_pd(d, d));
        }
        let tail = &row[whole..];
        let var = sum8(lanes(acc), tail, |v| (v - mean) * (v - mean)) / width as f64;
        let inv = inv_std(var, eps);
        let inv_v = _mm512_set1_pd(inv);
        for i in (0..whole).step_by(8) {
            let y = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_sub_pd(load(i), mean_v), inv_v));
            // SAFETY: i + 8 <= whole <= the length of `row`, `gamma` and `beta` (asserted).
            unsafe {
                let g = _mm256_loadu_ps(gamma.as_ptr().add(i));
                let b = _mm256_loadu_ps(beta.as_ptr().add(i));
                _mm256_storeu_ps(ptr.add(i), _mm256_add_ps(_mm256_mul_ps(y, g), b));
            }
        }
        normalise(
            &mut row[whole..],
            &gamma[whole..],
            &beta[whole..],
            (mean, inv),
        );
    }

    /// GELU in place.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub fn gelu(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(16);
        for c in &mut chunks {
            // SAFETY: `c` is exactly 16 floats.
            unsafe { _mm512_storeu_ps(c.as_mut_ptr(), gelu16(_mm512_loadu_ps(c.as_ptr()))) };
        }
        for v in chunks.into_remainder() {
            *v = gelu_scalar(*v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN));
        let x = _mm256_min_ps(x, _mm256_set1_ps(EXP_MAX));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_P[0]);
        for c in &EXP_P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn gelu8(x: __m256) -> __m256 {
        let sign = _mm256_set1_ps(-0.0);
        let z = _mm256_mul_ps(
            _mm256_andnot_ps(sign, x),
            _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
        );
        let one = _mm256_set1_ps(1.0);
        let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(ERF_P), z, one));
        let mut p = _mm256_set1_ps(ERF_A[4]);
        for a in ERF_A[..4].iter().rev() {
            p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(*a));
        }
        let p = _mm256_mul_ps(p, t);
        let e = exp8(_mm256_xor_ps(_mm256_mul_ps(z, z), sign));
        let erf = _mm256_fnmadd_ps(p, e, one);
        // erf takes x's sign when x < 0 (x = -0.0 keeps +erf, as the scalar `x < 0.0`).
        let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps());
        let erf = _mm256_xor_ps(erf, _mm256_and_ps(neg, sign));
        let h = _mm256_mul_ps(_mm256_set1_ps(0.5), x);
        _mm256_fmadd_ps(h, erf, h)
    }

    /// [`super::layer_norm_scalar`] with the eight f64 partial sums in two registers (lanes
    /// 0–3 and 4–7): whole groups of eight elements in vectors, the tail one by one.
    #[target_feature(enable = "avx2")]
    pub fn layer_norm(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        assert!(gamma.len() == row.len() && beta.len() == row.len());
        let width = row.len();
        let whole = width - width % 8;
        let ptr = row.as_mut_ptr();
        let load = |i: usize| {
            // SAFETY: callers pass i + 8 <= whole <= row.len().
            let v = unsafe { _mm256_loadu_ps(ptr.add(i)) };
            (
                _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
            )
        };
        let lanes = |(a, b): (__m256d, __m256d)| {
            let mut s = [0f64; 8];
            // SAFETY: `s` holds eight f64.
            unsafe {
                _mm256_storeu_pd(s.as_mut_ptr(), a);
                _mm256_storeu_pd(s.as_mut_ptr().add(4), b);
            }
            s
        };
        let (mut a, mut b) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        for i in (0..whole).step_by(8) {
            let (lo, hi) = load(i);
            a = _mm256_add_pd(a, lo);
            b = _mm256_add_pd(b, hi);
        }
        let mean = sum8(lanes((a, b)), &row[whole..], |v| v) / width as f64;
        let mean_v = _mm256_set1_pd(mean);
        let (mut a, mut b) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        for i in (0..whole).step_by(8) {
            let (lo, hi) = load(i);
            let (dl, dh) = (_mm256_sub_pd(lo, mean_v), _mm256_sub_pd(hi, mean_v));
            a = _mm256_add_pd(a, _mm256_mul_pd(dl, dl));
            b = _mm256_add_pd(b, _mm256_mul_pd(dh, dh));
        }
        let tail = &row[whole..];
        let var = sum8(lanes((a, b)), tail, |v| (v - mean) * (v - mean)) / width as f64;
        let inv = inv_std(var, eps);
        let inv_v = _mm256_set1_pd(inv);
        for i in (0..whole).step_by(8) {
            let (lo, hi) = load(i);
            let lo = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_sub_pd(lo, mean_v), inv_v));
            let hi = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_sub_pd(hi, mean_v), inv_v));
            let y = _mm256_set_m128(hi, lo);
            // SAFETY: i + 8 <= whole <= the length of `row`, `gamma` and `beta` (asserted).
            unsafe {
                let g = _mm256_loadu_ps(gamma.as_ptr().add(i));
                let b = _mm256_loadu_ps(beta.as_ptr().add(i));
                _mm256_storeu_ps(ptr.add(i), _mm256_add_ps(_mm256_mul_ps(y, g), b));
            }
        }
        normalise(
            &mut row[whole..],
            &gamma[whole..],
            &beta[whole..],
            (mean, inv),
        );
    }

    /// GELU in place.
    #[target_feature(enable = "avx2,fma")]
    pub fn gelu(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` is exactly 8 floats.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), gelu8(_mm256_loadu_ps(c.as_ptr()))) };
        }
        for v in chunks.into_remainder() {
            *v = gelu_scalar(*v);
        }
    }

    /// [`super::attend_scalar`] for `Q` queries of one sequence and head at once (they share
    /// every key and value load; `Q` × 4 independent FMA chains keep both FMA units busy).
    /// Requires `hd % 8 == 0`, `stride ≥ len` rounded up to 8, and `scores` of `Q` such rows.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub fn attend<const Q: usize>(
        qs: [&[f32]; Q],
        kt: &[f32],
        stride: usize,
        len: usize,
        v: &[f32],
        v_stride: usize,
        scale: f32,
        scores: &mut [f32],
        mut outs: [&mut [f32]; Q],
    ) {
        let hd = qs[0].len();
        let l8 = len.next_multiple_of(8);
        assert!(
            len > 0 && hd.is_multiple_of(8) && stride >= l8 && kt.len() >= (hd - 1) * stride + l8
        );
        assert!(qs.iter().all(|q| q.len() == hd) && outs.iter().all(|o| o.len() == hd));
        assert!(scores.len() >= Q * l8 && v.len() >= (len - 1) * v_stride + hd);
        let scale_v = _mm256_set1_ps(scale);
        // Scores, 32 keys at a time where possible, then 8 at a time; per (query, key) the
        // head dimension is summed in order.
        let mut j = 0;
        while j < l8 {
            if j + 32 <= l8 {
                scores_block::<Q, 4>(&qs, kt, stride, j, l8, scale_v, scores);
                j += 32;
            } else {
                scores_block::<Q, 1>(&qs, kt, stride, j, l8, scale_v, scores);
                j += 8;
            }
        }
        let inv = softmax_rows::<Q>(scores, l8, len).map(|i| _mm256_set1_ps(i));
        // Context: per (query, dimension) the keys are summed in order; up to 32 dimensions
        // of every query at once.
        let mut d0 = 0;
        while d0 < hd {
            let n = match (hd - d0) / 8 {
                1 => 1,
                2 | 3 => 2,
                _ => 4,
            };
            match n {
                1 => context_block::<Q, 1>(scores, l8, len, v, v_stride, d0, &inv, &mut outs),
                2 => context_block::<Q, 2>(scores, l8, len, v, v_stride, d0, &inv, &mut outs),
                _ => context_block::<Q, 4>(scores, l8, len, v, v_stride, d0, &inv, &mut outs),
            }
            d0 += 8 * n;
        }
    }

    /// The softmax numerators of `Q` score rows (row `i` at `scores[i·l8..]`, `len` valid
    /// scores, `l8` = `len` rounded up to 8): `exp(s − max)` in place, zero past `len`; returns
    /// each row's inverse sum (summed in 8 lanes, reduced in the canonical order).
    #[target_feature(enable = "avx2,fma")]
    pub fn softmax_rows<const Q: usize>(scores: &mut [f32], l8: usize, len: usize) -> [f32; Q] {
        assert!(len > 0 && l8 == len.next_multiple_of(8) && scores.len() >= Q * l8);
        let mut inv = [0f32; Q];
        let full = len / 8;
        for (qi, inv) in inv.iter_mut().enumerate() {
            let row = &mut scores[qi * l8..][..l8];
            // max is exact, so the vector order gives the scalar fold's value.
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            for c in 0..full {
                // SAFETY: c * 8 + 8 <= len <= row.len().
                m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(row.as_ptr().add(c * 8)) });
            }
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
            let max = lanes
                .iter()
                .chain(&row[full * 8..len])
                .fold(f32::NEG_INFINITY, |m, &s| if m > s { m } else { s });
            let maxv = _mm256_set1_ps(max);
            let mut sum = _mm256_setzero_ps();
            for c in 0..l8 / 8 {
                // SAFETY: c * 8 + 8 <= l8 == row.len().
                unsafe {
                    let p = row.as_mut_ptr().add(c * 8);
                    let mut e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), maxv));
                    let valid = len.saturating_sub(c * 8).min(8);
                    if valid < 8 {
                        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                        let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), idx);
                        e = _mm256_and_ps(e, _mm256_castsi256_ps(keep));
                    }
                    _mm256_storeu_ps(p, e);
                    sum = _mm256_add_ps(sum, e);
                }
            }
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
            *inv = 1.0 / reduce8(&lanes);
        }
        inv
    }

    /// Scores of keys `j..j + 8N` for every query, summed over the head dimension in order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn scores_block<const Q: usize, const N: usize>(
        qs: &[&[f32]; Q],
        kt: &[f32],
        stride: usize,
        j: usize,
        l8: usize,
        scale: __m256,
        scores: &mut [f32],
    ) {
        let hd = qs[0].len();
        assert!(j + 8 * N <= stride && kt.len() >= (hd - 1) * stride + j + 8 * N);
        assert!(scores.len() >= (Q - 1) * l8 + j + 8 * N);
        let mut acc = [[_mm256_setzero_ps(); N]; Q];
        for d in 0..hd {
            let mut k = [_mm256_setzero_ps(); N];
            for (c, k) in k.iter_mut().enumerate() {
                // SAFETY: d * stride + j + 8c + 8 <= (hd-1)*stride + j + 8N <= kt.len().
                *k = unsafe { _mm256_loadu_ps(kt.as_ptr().add(d * stride + j + 8 * c)) };
            }
            for (q, acc) in qs.iter().zip(acc.iter_mut()) {
                let qd = _mm256_set1_ps(q[d]);
                for (a, k) in acc.iter_mut().zip(&k) {
                    *a = _mm256_fmadd_ps(qd, *k, *a);
                }
            }
        }
        for (qi, acc) in acc.iter().enumerate() {
            for (c, a) in acc.iter().enumerate() {
                // SAFETY: qi * l8 + j + 8c + 8 <= (Q-1)*l8 + j + 8N <= scores.len().
                unsafe {
                    _mm256_storeu_ps(
                        scores.as_mut_ptr().add(qi * l8 + j + 8 * c),
                        _mm256_mul_ps(*a, scale),
                    )
                };
            }
        }
    }

    /// Dimensions `d0..d0 + 8N` of every query's context, summed over keys in order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn context_block<const Q: usize, const N: usize>(
        scores: &[f32],
        l8: usize,
        len: usize,
        v: &[f32],
        v_stride: usize,
        d0: usize,
        inv: &[__m256; Q],
        outs: &mut [&mut [f32]; Q],
    ) {
        assert!(scores.len() >= (Q - 1) * l8 + len);
        assert!(v.len() >= (len - 1) * v_stride + d0 + 8 * N);
        assert!(outs.iter().all(|o| o.len() >= d0 + 8 * N));
        let mut acc = [[_mm256_setzero_ps(); N]; Q];
        for jj in 0..len {
            let mut vv = [_mm256_setzero_ps(); N];
            for (c, vv) in vv.iter_mut().enumerate() {
                // SAFETY: jj * v_stride + d0 + 8c + 8 <= (len-1)*v_stride + d0 + 8N <= v.len().
                *vv = unsafe { _mm256_loadu_ps(v.as_ptr().add(jj * v_stride + d0 + 8 * c)) };
            }
            for (qi, acc) in acc.iter_mut().enumerate() {
                let p = _mm256_set1_ps(scores[qi * l8 + jj]);
                for (a, vv) in acc.iter_mut().zip(&vv) {
                    *a = _mm256_fmadd_ps(p, *vv, *a);
                }
            }
        }
        for ((acc, out), inv) in acc.iter().zip(outs.iter_mut()).zip(inv) {
            for (c, a) in acc.iter().enumerate() {
                // SAFETY: d0 + 8c + 8 <= out.len() (asserted).
                unsafe {
                    _mm256_storeu_ps(out.as_mut_ptr().add(d0 + 8 * c), _mm256_mul_ps(*a, *inv))
                };
            }
        }
    }
}

/// `exp` of every value in place, on the selected ISA (identical bits on every path).
pub fn exp(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() >= Isa::Avx2 {
        use std::arch::x86_64::*;
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: AVX2+FMA selected only when present; `c` is exactly 8 floats.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), avx2::exp8(_mm256_loadu_ps(c.as_ptr()))) };
        }
        for v in chunks.into_remainder() {
            *v = exp_scalar(*v);
        }
        return;
    }
    x.iter_mut().for_each(|v| *v = exp_scalar(*v));
}

/// GELU (erf form) in place, on the selected ISA.
pub fn gelu(x: &mut [f32]) {
    gelu_at(isa(), x);
}

/// [`gelu`] on the given ISA level (at most the CPU's).
pub(super) fn gelu_at(level: Isa, x: &mut [f32]) {
    assert!(level <= detect(), "{level:?} is beyond this CPU");
    #[cfg(target_arch = "x86_64")]
    if level >= Isa::Avx512 {
        // SAFETY: the level is at most the CPU's (asserted): it has AVX-512 F and DQ.
        unsafe { avx512::gelu(x) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level >= Isa::Avx2 {
        // SAFETY: the level is at most the CPU's (asserted): it has AVX2 and FMA.
        unsafe { avx2::gelu(x) };
        return;
    }
    x.iter_mut().for_each(|v| *v = gelu_scalar(*v));
}

/// Attention of `Q` (1 to 4) queries of one sequence over one head on the selected ISA (see
/// [`attend_scalar`] for the arguments; `scores` holds `Q` rows of `stride`). The same bits
/// on every path and for any grouping of queries.
#[allow(clippy::too_many_arguments)]
pub fn attend<const Q: usize>(
    qs: [&[f32]; Q],
    kt: &[f32],
    stride: usize,
    len: usize,
    v: &[f32],
    v_stride: usize,
    scale: f32,
    scores: &mut [f32],
    outs: [&mut [f32]; Q],
) {
    attend_at(isa(), qs, kt, stride, len, v, v_stride, scale, scores, outs);
}

/// [`attend`] on the given ISA level (at most the CPU's).
#[allow(clippy::too_many_arguments)]
fn attend_at<const Q: usize>(
    level: Isa,
    qs: [&[f32]; Q],
    kt: &[f32],
    stride: usize,
    len: usize,
    v: &[f32],
    v_stride: usize,
    scale: f32,
    scores: &mut [f32],
    outs: [&mut [f32]; Q],
) {
    assert!(level <= detect(), "{level:?} is beyond this CPU");
    let fits = |lanes: usize| {
        len > 0
            && qs[0].len().is_multiple_of(lanes)
            && stride >= len.next_multiple_of(8)
            && scores.len() >= Q * len.next_multiple_of(8)
    };
    #[cfg(target_arch = "x86_64")]
    if level >= Isa::Avx512 && fits(16) {
        // SAFETY: the level is at most the CPU's (asserted): it has AVX-512 F and DQ, AVX2
        // and FMA; the kernel asserts the slice bounds it relies on.
        unsafe { avx512::attend::<Q>(qs, kt, stride, len, v, v_stride, scale, scores, outs) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level >= Isa::Avx2 && fits(8) {
        // Two queries at a time at most: more accumulators than AVX2's 16 registers hold.
        let mut outs = outs.into_iter();
        for qs in qs.chunks(2) {
            let o1 = outs.next().expect("an output per query");
            // SAFETY (both calls): the level is at most the CPU's (asserted): it has AVX2 and
            // FMA; the kernel asserts the slice bounds it relies on.
            if let [a, b] = *qs {
                let o2 = outs.next().expect("an output per query");
                let (qs, os) = ([a, b], [o1, o2]);
                unsafe { avx2::attend::<2>(qs, kt, stride, len, v, v_stride, scale, scores, os) };
            } else {
                let (qs, os) = ([qs[0]], [o1]);
                unsafe { avx2::attend::<1>(qs, kt, stride, len, v, v_stride, scale, scores, os) };
            }
        }
        return;
    }
    for (q, out) in qs.into_iter().zip(outs) {
        attend_scalar(q, kt, stride, len, v, v_stride, scale, scores, out);
    }
}

/// Combine eight f64 lane sums in the canonical order `((s0+s4)+(s2+s6)) + ((s1+s5)+(s3+s7))`.
fn reduce8_f64(s: &[f64; 8]) -> f64 {
    ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]))
}

/// `Σ f(v)` in f64 in a fixed order: eight partial sums (sum `l` takes the elements
/// `i ≡ l mod 8`, in order), combined by [`reduce8_f64`]. Independent sums, unlike one
/// running sum, do not wait on each other's additions, and eight f64 lanes are one 512-bit
/// register (two 256-bit ones). `lanes` holds the sums of the elements before `rest` (zero
/// for a whole row; the SIMD paths pass their registers' sums and the tail past their last
/// whole group of eight, so `rest[i]` belongs to lane `i mod 8`).
fn sum8(mut lanes: [f64; 8], rest: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    for (i, &v) in rest.iter().enumerate() {
        lanes[i % 8] += f(v as f64);
    }
    reduce8_f64(&lanes)
}

/// `1 / sqrt(var + eps)`.
fn inv_std(var: f64, eps: f32) -> f64 {
    1.0 / (var + eps as f64).sqrt()
}

/// `((v - mean) * inv)` rounded to f32, then `· gamma + beta` (a multiply, then an add).
fn normalise(row: &mut [f32], gamma: &[f32], beta: &[f32], (mean, inv): (f64, f64)) {
    for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
        *v = ((*v as f64 - mean) * inv) as f32 * g + b;
    }
}

/// LayerNorm of one row, scalar reference: `(y - mean) / sqrt(var + eps) * gamma + beta`,
/// statistics in f64 (see [`sum8`]), the normalised value rounded to f32 before the affine
/// step (see [`normalise`]).
fn layer_norm_scalar(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let width = row.len() as f64;
    let mean = sum8([0.0; 8], row, |v| v) / width;
    let var = sum8([0.0; 8], row, |v| (v - mean) * (v - mean)) / width;
    normalise(row, gamma, beta, (mean, inv_std(var, eps)));
}

/// LayerNorm of each `gamma.len()`-wide row of `x + residual`, written to `x`, on the
/// selected ISA (the same bits on every level; see [`layer_norm_scalar`]).
pub fn add_layer_norm(
    x: &mut [f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    add_layer_norm_at(isa(), x, residual, gamma, beta, eps);
}

/// [`add_layer_norm`] on the given ISA level (at most the CPU's).
fn add_layer_norm_at(
    level: Isa,
    x: &mut [f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    assert!(level <= detect(), "{level:?} is beyond this CPU");
    let width = gamma.len();
    assert!(beta.len() == width && x.len().is_multiple_of(width.max(1)));
    if let Some(r) = residual {
        assert_eq!(r.len(), x.len(), "residual shape");
    }
    for (i, row) in x.chunks_exact_mut(width).enumerate() {
        // Row by row, so the row is still in L1 when it is normalised.
        if let Some(r) = residual {
            for (v, r) in row.iter_mut().zip(&r[i * width..]) {
                *v += r;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if level >= Isa::Avx512 {
            // SAFETY: the level is at most the CPU's (asserted): it has AVX-512F.
            unsafe { avx512::layer_norm(row, gamma, beta, eps) };
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if level >= Isa::Avx2 {
            // SAFETY: the level is at most the CPU's (asserted): it has AVX2.
            unsafe { avx2::layer_norm(row, gamma, beta, eps) };
            continue;
        }
        layer_norm_scalar(row, gamma, beta, eps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The error function, |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit), in f64.
    fn erf(x: f64) -> f64 {
        let z = x.abs();
        let t = 1.0 / (1.0 + 0.5 * z);
        let poly = -z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77))))))));
        let erfc = t * poly.exp();
        if x >= 0.0 { 1.0 - erfc } else { erfc - 1.0 }
    }

    #[test]
    fn erf_reference_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_8),
            (1.0, 0.842_700_792_9),
            (-2.0, -0.995_322_265_0),
            (3.0, 0.999_977_909_5),
        ] {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x}) = {}", erf(x));
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn exp_and_gelu_are_accurate() {
        for i in -8000..8000 {
            let x = i as f32 / 100.0;
            let want = (x as f64).exp();
            let got = exp_scalar(x) as f64;
            if x > -80.0 {
                assert!(
                    ((got - want) / want).abs() < 3e-7,
                    "exp({x}) = {got}, want {want}"
                );
            }
            let g = gelu_scalar(x) as f64;
            let gw = 0.5 * x as f64 * (1.0 + erf(x as f64 / 2f64.sqrt()));
            assert!(
                (g - gw).abs() < 4e-7 * (1.0 + gw.abs()),
                "gelu({x}) = {g}, want {gw}"
            );
        }
    }

    proptest! {
        #[test]
        fn simd_exp_and_gelu_match_the_scalar_reference(
            x in proptest::collection::vec(prop_oneof![-100f32..100f32, -3f32..3f32, Just(0.0f32), Just(-0.0f32)], 0..70)
        ) {
            let mut e = x.clone();
            exp(&mut e);
            prop_assert_eq!(bits(&e), bits(&x.iter().map(|&v| exp_scalar(v)).collect::<Vec<_>>()));
            let want = bits(&x.iter().map(|&v| gelu_scalar(v)).collect::<Vec<_>>());
            for level in [Isa::Avx2, Isa::Avx512] {
                if level <= detect() {
                    let mut g = x.clone();
                    gelu_at(level, &mut g);
                    prop_assert_eq!(bits(&g), want.clone(), "{:?}", level);
                }
            }
        }

        #[test]
        fn simd_layer_norm_matches_the_scalar_reference(
            width in 1usize..70, rows in 1usize..4, scale in prop_oneof![Just(1f32), Just(1e-3f32), Just(1e4f32)],
            seed in any::<u64>()
        ) {
            let mut s = seed | 1;
            let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 1.0 };
            let x: Vec<f32> = (0..rows * width).map(|_| next() * scale).collect();
            let r: Vec<f32> = (0..rows * width).map(|_| next()).collect();
            let gamma: Vec<f32> = (0..width).map(|_| next()).collect();
            let beta: Vec<f32> = (0..width).map(|_| next()).collect();
            let mut want = x.clone();
            add_layer_norm_at(Isa::Scalar, &mut want, Some(&r), &gamma, &beta, 1e-12);
            // The reference is LayerNorm (to f32 precision).
            for (row, (xr, rr)) in want.chunks(width).zip(x.chunks(width).zip(r.chunks(width))) {
                let y: Vec<f64> = xr.iter().zip(rr).map(|(a, b)| (a + b) as f64).collect();
                let mean = y.iter().sum::<f64>() / width as f64;
                let var = y.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / width as f64;
                for (i, got) in row.iter().enumerate() {
                    let norm = (y[i] - mean) / (var + 1e-12).sqrt();
                    let expect = norm * gamma[i] as f64 + beta[i] as f64;
                    prop_assert!((*got as f64 - expect).abs() < 1e-5 * (1.0 + norm.abs()), "{} vs {}", got, expect);
                }
            }
            for level in [Isa::Avx2, Isa::Avx512] {
                if level <= detect() {
                    let mut got = x.clone();
                    add_layer_norm_at(level, &mut got, Some(&r), &gamma, &beta, 1e-12);
                    prop_assert_eq!(bits(&got), bits(&want), "{:?}", level);
                }
            }
        }

        #[test]
        fn simd_attention_matches_the_scalar_reference(
            heads8 in 1usize..5, len in 1usize..70, extra in 0usize..9, seed in any::<u64>()
        ) {
            let hd = heads8 * 8;
            let stride = len.next_multiple_of(8) + extra;
            let v_stride = hd + extra;
            let mut s = seed | 1;
            let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; ((s >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0 };
            let q: Vec<f32> = (0..hd).map(|_| next()).collect();
            let kt: Vec<f32> = (0..hd * stride).map(|_| next()).collect();
            let v: Vec<f32> = (0..len * v_stride).map(|_| next()).collect();
            let mut s1 = vec![0f32; stride];
            let mut s2 = vec![0f32; stride];
            let mut o1 = vec![0f32; hd];
            let mut o2 = vec![0f32; hd];
            attend_scalar(&q, &kt, stride, len, &v, v_stride, 0.3, &mut s2, &mut o2);
            let q2: Vec<f32> = q.iter().map(|x| x * -0.7).collect();
            let mut o3 = vec![0f32; hd];
            attend_scalar(&q2, &kt, stride, len, &v, v_stride, 0.3, &mut s2, &mut o3);
            // Every level this CPU has (AVX-512 takes head widths of 16k; 8k fall back).
            for level in [Isa::Avx2, Isa::Avx512] {
                if level > detect() {
                    continue;
                }
                attend_at(level, [&q[..]], &kt, stride, len, &v, v_stride, 0.3, &mut s1, [&mut o1[..]]);
                prop_assert_eq!(bits(&o1), bits(&o2), "{:?}", level);
                // Two queries at once: each gets what it gets alone.
                let (mut p1, mut p2) = (vec![0f32; hd], vec![0f32; hd]);
                let mut s3 = vec![0f32; 2 * stride];
                attend_at(level, [&q[..], &q2[..]], &kt, stride, len, &v, v_stride, 0.3, &mut s3, [&mut p1[..], &mut p2[..]]);
                prop_assert_eq!(bits(&p1), bits(&o2), "{:?}", level);
                prop_assert_eq!(bits(&p2), bits(&o3), "{:?}", level);
                // Four at once (AVX2 takes them in pairs).
                let mut four = vec![vec![0f32; hd]; 4];
                let mut s4 = vec![0f32; 4 * stride];
                let [f0, f1, f2, f3] = &mut four[..] else { unreachable!() };
                attend_at(level, [&q[..], &q2[..], &q2[..], &q[..]], &kt, stride, len, &v, v_stride, 0.3, &mut s4, [&mut f0[..], &mut f1[..], &mut f2[..], &mut f3[..]]);
                for (f, want) in four.iter().zip([&o2, &o3, &o3, &o2]) {
                    prop_assert_eq!(bits(f), bits(want), "{:?}", level);
                }
            }
            // And it is attention: a convex combination of the values.
            for d in 0..hd {
                let lo = (0..len).map(|j| v[j * v_stride + d]).fold(f32::INFINITY, f32::min);
                let hi = (0..len).map(|j| v[j * v_stride + d]).fold(f32::NEG_INFINITY, f32::max);
                prop_assert!(o1[d] >= lo - 1e-4 && o1[d] <= hi + 1e-4);
            }
        }
    }
}
