//! Block-quantised weights (ggml's Q4_0, Q4_1, Q5_0, Q8_0, and Q4_K and Q6_K repacked at
//! load), int8 activations, and the integer dot-product kernels of the language-model path.
//!
//! A weight row is a run of 32-element blocks, each with an f16 scale (and for Q4_1 an f16
//! minimum; Q5_0 adds a fifth bit per element from a u32). The k-quants' 256-element
//! super-blocks are repacked once, exactly, into 32-element blocks of the same kind with f32
//! scales: Q4_K's sub-block scale and minimum (`d·sc`, `dmin·m`, exact products in f32)
//! before its nibbles, Q6_K's two 16-element sub-block scales before its 32 values as int8.
//! The kernels treat them like Q4_1 and Q8_0 (Q6_K's two scales fall on lanes 0–3 and 4–7).
//! Activations are quantised per 32-element block to int8 as llama.cpp's `block_q8_1` does
//! (scale and `d·Σq` stored as f16), so a block's dot product is an exact
//! integer sum and the arithmetic is the one llama.cpp's CPU backend performs.
//!
//! Determinism by construction: the canonical order is defined on eight lanes. Lane `l` of a
//! block is the exact integer sum of elements `4l..4l+3`; per block, lane `l` of the
//! accumulator takes `fma(dw·dx, p_l, acc_l)`; for Q4_1 a separate scalar takes
//! `fma(mw, sx, summ)` block by block (`sx` = the activation block's `d·Σq`); the result is
//! `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)) + summ`. That is llama.cpp's
//! `ggml_vec_dot_q4_1_q8_1` and tinyBLAS's Q8_0 tile order on x86. The scalar reference does
//! exactly that, the AVX2 path does it eight lanes at a time, so every ISA level gives the
//! same bits. Rows are split across threads by output element, never along the summed
//! dimension, and a token's activations are quantised on their own, so results do not
//! depend on batch-mates.

use half::{bf16, f16};

use crate::native::kernels::{Isa, isa};

/// Elements per quantisation block.
pub const QK: usize = 32;

/// The weight encodings the LLM kernels run directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QType {
    /// 4-bit, symmetric: `x = (q - 8)·d`; 18 bytes a block.
    Q4_0,
    /// 4-bit with minimum: `x = q·d + m`; 20 bytes a block.
    Q4_1,
    /// 8-bit: `x = q·d`; 34 bytes a block.
    Q8_0,
    /// 5-bit, symmetric: `x = (q - 16)·d`, bit 4 of element `i` is bit `i` of a u32;
    /// 22 bytes a block.
    Q5_0,
    /// Q4_K repacked: f32 `d`, f32 `m`, then 16 bytes of nibbles as Q4_1 orders them,
    /// `x = q·d + m`; 24 bytes a block.
    Q4K,
    /// Q6_K repacked: f32 scales of elements 0–15 and 16–31, then 32 int8 values in
    /// -32..=31, `x = q·d_half`; 40 bytes a block.
    Q6K,
}

impl QType {
    /// Bytes per 32-element block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q8_0 => 34,
            QType::Q5_0 => 22,
            QType::Q4K => 24,
            QType::Q6K => 40,
        }
    }

    /// Whether weights are unsigned with a per-block minimum (`x = q·d + m`).
    pub const fn has_min(self) -> bool {
        matches!(self, QType::Q4_1 | QType::Q4K)
    }
}

/// Elements per k-quant super-block.
pub const QK_K: usize = 256;
/// Bytes of a Q4_K super-block in a GGUF file.
pub const Q4_K_BYTES: usize = 144;
/// Bytes of a Q6_K super-block in a GGUF file.
pub const Q6_K_BYTES: usize = 210;

/// Q4_K's 6-bit scale and minimum of sub-block `j` (0..8), as ggml packs them in 12 bytes.
fn q4_k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Repack Q4_K super-blocks (`src.len()` a multiple of 144) into [`QType::Q4K`] blocks.
pub fn repack_q4_k(src: &[u8]) -> Vec<u8> {
    assert!(
        src.len().is_multiple_of(Q4_K_BYTES),
        "not whole Q4_K blocks"
    );
    let mut out = Vec::with_capacity(src.len() / Q4_K_BYTES * 8 * QType::Q4K.block_bytes());
    for sb in src.chunks_exact(Q4_K_BYTES) {
        let (d, dmin) = (f16_at(sb, 0), f16_at(sb, 2));
        let (scales, qs) = (&sb[4..16], &sb[16..]);
        // 64 elements per 32 bytes: sub-block 2c in the low nibbles, 2c+1 in the high ones.
        for c in 0..4 {
            let bytes = &qs[32 * c..32 * c + 32];
            for (h, shift) in [(0usize, 0u32), (1, 4)] {
                let (sc, m) = q4_k_scale_min(2 * c + h, scales);
                out.extend_from_slice(&(d * f32::from(sc)).to_le_bytes());
                out.extend_from_slice(&(-(dmin * f32::from(m))).to_le_bytes());
                let nib = |i: usize| (bytes[i] >> shift) & 15;
                out.extend((0..16).map(|j| nib(j) | (nib(j + 16) << 4)));
            }
        }
    }
    out
}

/// Repack Q6_K super-blocks (`src.len()` a multiple of 210) into [`QType::Q6K`] blocks.
pub fn repack_q6_k(src: &[u8]) -> Vec<u8> {
    assert!(
        src.len().is_multiple_of(Q6_K_BYTES),
        "not whole Q6_K blocks"
    );
    let mut out = Vec::with_capacity(src.len() / Q6_K_BYTES * 8 * QType::Q6K.block_bytes());
    for sb in src.chunks_exact(Q6_K_BYTES) {
        let (ql, qh, sc) = (&sb[..128], &sb[128..192], &sb[192..208]);
        let d = f16_at(sb, 208);
        // Element e of the super-block: half h = e / 128, then within it l = e % 32 and
        // quarter g = (e % 128) / 32 pick the nibble of ql and the bit pair of qh.
        let value = |e: usize| -> i8 {
            let (h, g, l) = (e / 128, (e % 128) / 32, e % 32);
            let lo = ql[64 * h + 32 * (g & 1) + l] >> (4 * (g >> 1)) & 15;
            let hi = (qh[32 * h + l] >> (2 * g)) & 3;
            ((lo | (hi << 4)) as i8) - 32
        };
        for b in 0..8 {
            for half in 0..2 {
                let s = sc[2 * b + half] as i8;
                out.extend_from_slice(&(d * f32::from(s)).to_le_bytes());
            }
            out.extend((0..QK).map(|i| value(32 * b + i) as u8));
        }
    }
    out
}

/// One block of quantised activations.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(4))]
pub struct Q8Block {
    /// The int8 values (never -128).
    pub qs: [i8; QK],
    /// Scale, rounded through f16 as llama.cpp stores it: `x ≈ qs·d`.
    pub d: f32,
    /// `(max|x|/127) · Σ qs`, rounded through f16 (llama.cpp's `block_q8_1::s`; used by
    /// Q4_1's minimum term).
    pub s: f32,
}

/// Quantise one row of activations (`x.len()` a multiple of 32) into `out` as llama.cpp's
/// x86 `quantize_row_q8_1` does: per block, `q = round_ties_even(x · (127 / max|x|))` in
/// f32, `d = f16(max|x| / 127)`, `s = f16((max|x| / 127) · Σ q)`.
pub fn quantize_row(x: &[f32], out: &mut [Q8Block]) {
    assert_eq!(x.len(), out.len() * QK, "row length is not blocks × 32");
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() returns Avx2 only when the CPU has AVX2 and FMA; lengths checked.
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni => unsafe { avx2::quantize_row(x, out) },
        _ => quantize_row_scalar(x, out),
    }
}

/// [`quantize_row`], scalar reference.
pub fn quantize_row_scalar(x: &[f32], out: &mut [Q8Block]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        for (q, &v) in ob.qs.iter_mut().zip(xb) {
            *q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
        finish_block(ob, amax);
    }
}

/// Set the scale and the sum term of a block whose `qs` are final.
#[inline]
fn finish_block(ob: &mut Q8Block, amax: f32) {
    let d = amax / 127.0;
    let sum: i32 = ob.qs.iter().map(|&q| i32::from(q)).sum();
    ob.d = f16::from_f32(d).to_f32();
    ob.s = f16::from_f32(d * sum as f32).to_f32();
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Dequantise `n` elements of a row of `ty` blocks (reference and embedding lookup).
pub fn dequantize_row(ty: QType, bytes: &[u8], out: &mut [f32]) {
    let bb = ty.block_bytes();
    assert_eq!(
        bytes.len(),
        out.len() / QK * bb,
        "row bytes do not match its length"
    );
    for (b, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
        let (w, d, m) = weight_block(ty, b);
        for (i, (o, q)) in o.iter_mut().zip(w).enumerate() {
            // ggml's `q·d + m` (Q4_K's `d·q - dmin·m`) and `q·d` (Q6_K's `(d·sc)·q`): a zero
            // minimum is not added, which would turn a -0 into +0.
            let v = q as f32 * d[i / 16];
            *o = if ty.has_min() { v + m } else { v };
        }
    }
}

/// Convert little-endian F16 values to f32.
pub fn f16_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
        .collect()
}

/// Convert little-endian BF16 values to f32.
pub fn bf16_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
        .collect()
}

/// The integer weight value of element `i` of a block, the block's scale of elements 0–15
/// and 16–31 (equal but for Q6K), and its minimum.
fn weight_block(ty: QType, b: &[u8]) -> ([i32; QK], [f32; 2], f32) {
    let mut w = [0i32; QK];
    // Nibbles in Q4_1's order from byte `at`: element j low, element j + 16 high.
    let mut nibbles = |at: usize| {
        for j in 0..16 {
            w[j] = i32::from(b[at + j] & 15);
            w[j + 16] = i32::from(b[at + j] >> 4);
        }
    };
    let (d, m) = match ty {
        QType::Q4_0 => {
            nibbles(2);
            w.iter_mut().for_each(|v| *v -= 8);
            ([f16_at(b, 0); 2], 0.0)
        }
        QType::Q4_1 => {
            nibbles(4);
            ([f16_at(b, 0); 2], f16_at(b, 2))
        }
        QType::Q5_0 => {
            nibbles(6);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for (i, v) in w.iter_mut().enumerate() {
                *v = (*v | ((qh >> i) as i32 & 1) << 4) - 16;
            }
            ([f16_at(b, 0); 2], 0.0)
        }
        QType::Q4K => {
            nibbles(8);
            ([f32_at(b, 0); 2], f32_at(b, 4))
        }
        QType::Q8_0 => {
            for (v, &q) in w.iter_mut().zip(&b[2..2 + QK]) {
                *v = i32::from(q as i8);
            }
            ([f16_at(b, 0); 2], 0.0)
        }
        QType::Q6K => {
            for (v, &q) in w.iter_mut().zip(&b[8..8 + QK]) {
                *v = i32::from(q as i8);
            }
            ([f32_at(b, 0), f32_at(b, 4)], 0.0)
        }
    };
    (w, d, m)
}

/// Reduce eight lanes in the canonical order.
#[inline]
pub fn reduce8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// Canonical-order dot product of one weight row with one activation row, scalar reference.
pub fn dot_scalar(ty: QType, w: &[u8], x: &[Q8Block]) -> f32 {
    let bb = ty.block_bytes();
    assert_eq!(
        w.len(),
        x.len() * bb,
        "weight row and activations differ in length"
    );
    let mut acc = [0f32; 8];
    let mut summ = 0f32;
    for (b, xb) in w.chunks_exact(bb).zip(x) {
        let (wq, d, m) = weight_block(ty, b);
        let dd = [d[0] * xb.d, d[1] * xb.d];
        for (l, a) in acc.iter_mut().enumerate() {
            let p: i32 = (4 * l..4 * l + 4)
                .map(|i| wq[i] * i32::from(xb.qs[i]))
                .sum();
            *a = dd[l / 4].mul_add(p as f32, *a);
        }
        if ty.has_min() {
            summ = min_term(m, xb.s, summ);
        }
    }
    reduce8(acc) + summ
}

/// One block's share of Q4_1's minimum term: `summ + m·s` as llama.cpp's compiled
/// `summs += m * s` computes it.
#[inline(always)]
fn min_term(m: f32, s: f32, summ: f32) -> f32 {
    m.mul_add(s, summ)
}

/// `out[r * n_tok + t] = dot(w row r, x token t)` for the weight rows `w` (`rows` of them,
/// `stride` bytes each) and the `n_tok` activation rows in `x` (`nb` blocks each).
pub fn matmul_rows(
    ty: QType,
    w: &[u8],
    stride: usize,
    rows: usize,
    x: &[Q8Block],
    nb: usize,
    out: &mut [f32],
) {
    let n_tok = x.len() / nb;
    assert_eq!(
        w.len(),
        rows * stride,
        "weight rows do not match their count"
    );
    assert_eq!(
        stride,
        nb * ty.block_bytes(),
        "row stride does not match the block count"
    );
    assert_eq!(
        out.len(),
        rows * n_tok,
        "output does not match rows × tokens"
    );
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() returns Avx2 or above only when the CPU has AVX2, FMA and F16C; every
        // length was checked above.
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::matmul_rows(ty, w, stride, rows, x, nb, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() returns Avx512Vnni only when the CPU also has AVX-512 F, VL and VNNI.
        Isa::Avx512Vnni => unsafe { vnni::matmul_rows(ty, w, stride, rows, x, nb, out) },
        _ => {
            for r in 0..rows {
                for t in 0..n_tok {
                    out[r * n_tok + t] = dot_scalar(
                        ty,
                        &w[r * stride..(r + 1) * stride],
                        &x[t * nb..(t + 1) * nb],
                    );
                }
            }
        }
    }
}

/// The x86 kernels of one ISA level: `$features` for `target_feature`, `$dot4(u, s)` the
/// exact i32 sums of four adjacent u8 × s8 products (`u` ≤ 128, `s` never -128, so the AVX2
/// form's i16 pairs cannot saturate and both forms give the same integers).
#[cfg(target_arch = "x86_64")]
macro_rules! x86_kernels {
    ($features:literal, $dot4:expr, $max_tok:literal) => {
        use std::arch::x86_64::*;

        use super::super::{Q8Block, QType};

        /// Reduce eight lanes in the canonical order.
        #[inline]
        #[target_feature(enable = $features)]
        fn reduce(v: __m256) -> f32 {
            let mut a = [0f32; 8];
            // SAFETY: `a` has room for eight floats.
            unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
            super::super::reduce8(a)
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn f16(p: *const u8) -> f32 {
            // SAFETY: callers pass a pointer to two readable bytes.
            let bits = unsafe { (p as *const u16).read_unaligned() };
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn f32_at(p: *const u8) -> f32 {
            // SAFETY: callers pass a pointer to four readable bytes.
            unsafe { (p as *const f32).read_unaligned() }
        }

        /// A weight block's 32 values as bytes in element order (unsigned nibbles for Q4_1
        /// and Q4K, signed for the others), its scales of elements 0–15 and 16–31, and its
        /// minimum. `TY`: 0 Q4_0, 1 Q4_1, 2 Q8_0, 3 Q4K, 4 Q6K, 5 Q5_0.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn load_w<const TY: u8>(p: *const u8) -> (__m256i, [f32; 2], f32) {
            // SAFETY: callers pass a pointer to a whole block of type TY.
            unsafe {
                let nibbles = |at: usize| {
                    let v = _mm_loadu_si128(p.add(at) as *const __m128i);
                    let m4 = _mm_set1_epi8(15);
                    let lo = _mm_and_si128(v, m4);
                    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
                    _mm256_set_m128i(hi, lo)
                };
                match TY {
                    0 => {
                        let w = _mm256_sub_epi8(nibbles(2), _mm256_set1_epi8(8));
                        let d = f16(p);
                        (w, [d, d], 0.0)
                    }
                    1 => {
                        let d = f16(p);
                        (nibbles(4), [d, d], f16(p.add(2)))
                    }
                    2 => {
                        let d = f16(p);
                        (_mm256_loadu_si256(p.add(2) as *const __m256i), [d, d], 0.0)
                    }
                    3 => {
                        let d = f32_at(p);
                        (nibbles(8), [d, d], f32_at(p.add(4)))
                    }
                    5 => {
                        // Bit i of qh to 0x10 in byte i: byte i gets qh's byte i/8, every
                        // bit but i%8 set, and compares equal to all ones if that one is set.
                        let qh = (p.add(2) as *const i32).read_unaligned();
                        let spread = _mm256_shuffle_epi8(
                            _mm256_set1_epi32(qh),
                            _mm256_setr_epi64x(
                                0,
                                0x0101_0101_0101_0101,
                                0x0202_0202_0202_0202,
                                0x0303_0303_0303_0303,
                            ),
                        );
                        let all = _mm256_set1_epi64x(-1);
                        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
                        let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), all);
                        let high = _mm256_and_si256(set, _mm256_set1_epi8(0x10));
                        let w = _mm256_or_si256(nibbles(6), high);
                        let d = f16(p);
                        (_mm256_sub_epi8(w, _mm256_set1_epi8(16)), [d, d], 0.0)
                    }
                    _ => (
                        _mm256_loadu_si256(p.add(8) as *const __m256i),
                        [f32_at(p), f32_at(p.add(4))],
                        0.0,
                    ),
                }
            }
        }

        /// Whether kernel type `TY` has unsigned weights and a minimum (Q4_1, Q4K).
        const fn has_min(ty: u8) -> bool {
            ty == 1 || ty == 3
        }

        /// Lane sums of `w · x` over one block: exact int32, lane `l` = elements `4l..4l+3`.
        #[inline]
        #[target_feature(enable = $features)]
        fn lanes<const TY: u8>(w: __m256i, x: __m256i) -> __m256 {
            let (u, s) = if has_min(TY) {
                // Unsigned nibbles × signed activations.
                (w, x)
            } else {
                // |w| × (x with w's sign): the same products, with an unsigned left operand.
                (_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
            };
            _mm256_cvtepi32_ps($dot4(u, s))
        }

        /// A tile of `R` weight rows × `T` tokens, in the canonical order.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn tile<const TY: u8, const R: usize, const T: usize>(
            w: [*const u8; R],
            x: [*const Q8Block; T],
            nb: usize,
            bb: usize,
        ) -> [[f32; T]; R] {
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            let mut summ = [[0f32; T]; R];
            for b in 0..nb {
                let mut wv = [_mm256_setzero_si256(); R];
                let mut dw = [[0f32; 2]; R];
                let mut mw = [0f32; R];
                for r in 0..R {
                    // SAFETY: block b of row r is inside the row (nb blocks of bb bytes).
                    (wv[r], dw[r], mw[r]) = unsafe { load_w::<TY>(w[r].add(b * bb)) };
                    if T == 1 {
                        // Generation streams the weights once: ask for them ahead of use.
                        // (A prefetch never faults, even past the end of the mapping.)
                        _mm_prefetch::<_MM_HINT_T0>(w[r].wrapping_add(b * bb + 4 * 64) as *const i8);
                    }
                }
                for t in 0..T {
                    // SAFETY: block b of token t is inside its nb blocks.
                    let xb = unsafe { &*x[t].add(b) };
                    // SAFETY: qs is 32 bytes.
                    let xv = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
                    for r in 0..R {
                        let p = lanes::<TY>(wv[r], xv);
                        let dd = if TY == 4 {
                            _mm256_set_m128(
                                _mm_set1_ps(dw[r][1] * xb.d),
                                _mm_set1_ps(dw[r][0] * xb.d),
                            )
                        } else {
                            _mm256_set1_ps(dw[r][0] * xb.d)
                        };
                        acc[r][t] = _mm256_fmadd_ps(dd, p, acc[r][t]);
                        if has_min(TY) {
                            summ[r][t] = super::super::min_term(mw[r], xb.s, summ[r][t]);
                        }
                    }
                }
            }
            let mut out = [[0f32; T]; R];
            for r in 0..R {
                for t in 0..T {
                    out[r][t] = reduce(acc[r][t]) + summ[r][t];
                }
            }
            out
        }

        /// See [`super::matmul_rows`]; tiles of 4 rows × `$max_tok` tokens (2 with AVX2's 16
        /// vector registers, 4 with AVX-512VL's 32), smaller at the edges.
        ///
        /// # Safety
        /// The CPU must have AVX2, FMA and F16C; lengths as checked by the caller.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn matmul_rows(
            ty: QType,
            w: &[u8],
            stride: usize,
            rows: usize,
            x: &[Q8Block],
            nb: usize,
            out: &mut [f32],
        ) {
            // SAFETY: forwarded from the caller.
            unsafe {
                match ty {
                    QType::Q4_0 => run::<0>(w, stride, rows, x, nb, out, ty.block_bytes()),
                    QType::Q4_1 => run::<1>(w, stride, rows, x, nb, out, ty.block_bytes()),
                    QType::Q8_0 => run::<2>(w, stride, rows, x, nb, out, ty.block_bytes()),
                    QType::Q4K => run::<3>(w, stride, rows, x, nb, out, ty.block_bytes()),
                    QType::Q6K => run::<4>(w, stride, rows, x, nb, out, ty.block_bytes()),
                    QType::Q5_0 => run::<5>(w, stride, rows, x, nb, out, ty.block_bytes()),
                }
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn run<const TY: u8>(
            w: &[u8],
            stride: usize,
            rows: usize,
            x: &[Q8Block],
            nb: usize,
            out: &mut [f32],
            bb: usize,
        ) {
            let n_tok = x.len() / nb;
            let wp = |r: usize| w[r * stride..].as_ptr();
            let xp = |t: usize| x[t * nb..].as_ptr();
            let mut r = 0;
            while r < rows {
                let nr = (rows - r).min(4);
                let mut t = 0;
                while t < n_tok {
                    // Tiles of $max_tok tokens, then pairs and a single one.
                    let nt = if n_tok - t >= $max_tok {
                        $max_tok
                    } else {
                        (n_tok - t).min(2)
                    };
                    // SAFETY: rows r..r+nr and tokens t..t+nt exist; each has nb blocks.
                    unsafe {
                        match (nr, nt) {
                            (4, 4) => {
                                let o = tile::<TY, 4, 4>(
                                    [wp(r), wp(r + 1), wp(r + 2), wp(r + 3)],
                                    [xp(t), xp(t + 1), xp(t + 2), xp(t + 3)],
                                    nb,
                                    bb,
                                );
                                for (i, row) in o.iter().enumerate() {
                                    out[(r + i) * n_tok + t..][..4].copy_from_slice(row);
                                }
                            }
                            (4, 2) => {
                                let o = tile::<TY, 4, 2>(
                                    [wp(r), wp(r + 1), wp(r + 2), wp(r + 3)],
                                    [xp(t), xp(t + 1)],
                                    nb,
                                    bb,
                                );
                                for (i, row) in o.iter().enumerate() {
                                    out[(r + i) * n_tok + t..][..2].copy_from_slice(row);
                                }
                            }
                            (4, 1) => {
                                let o = tile::<TY, 4, 1>(
                                    [wp(r), wp(r + 1), wp(r + 2), wp(r + 3)],
                                    [xp(t)],
                                    nb,
                                    bb,
                                );
                                for (i, row) in o.iter().enumerate() {
                                    out[(r + i) * n_tok + t] = row[0];
                                }
                            }
                            (_, _) => {
                                for i in 0..nr {
                                    for j in 0..nt {
                                        out[(r + i) * n_tok + t + j] =
                                            tile::<TY, 1, 1>([wp(r + i)], [xp(t + j)], nb, bb)[0][0];
                                    }
                                }
                            }
                        }
                    }
                    t += nt;
                }
                r += nr;
            }
        }
    };
}

/// AVX2 + FMA + F16C: `vpmaddubsw` then `vpmaddwd` by ones for the lane sums.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    mod kernels {
        x86_kernels!(
            "avx2,fma,f16c",
            |u, s| _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
            2
        );
    }
    pub(crate) use kernels::matmul_rows;

    use std::arch::x86_64::*;

    /// See [`super::quantize_row`]; the same arithmetic eight values at a time.
    ///
    /// # Safety
    /// The CPU must have AVX2; `x.len() == out.len() * 32`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn quantize_row(x: &[f32], out: &mut [super::Q8Block]) {
        let sign = _mm256_set1_ps(-0.0);
        for (xb, ob) in x.chunks_exact(super::QK).zip(out.iter_mut()) {
            // SAFETY: xb holds 32 floats.
            let v = unsafe { [0, 8, 16, 24].map(|i| _mm256_loadu_ps(xb.as_ptr().add(i))) };
            let a = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_movehdup_ps(m));
            let amax = _mm_cvtss_f32(m);
            let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            let q = v.map(|v| {
                let y = _mm256_mul_ps(v, id);
                _mm256_cvtps_epi32(_mm256_round_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(y))
            });
            // i32 -> i16 -> i8 (packs interleave 128-bit lanes; the permute restores order).
            let q16a = _mm256_packs_epi32(q[0], q[1]);
            let q16b = _mm256_packs_epi32(q[2], q[3]);
            let q8 = _mm256_packs_epi16(q16a, q16b);
            let q8 = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            // SAFETY: qs is 32 bytes.
            unsafe { _mm256_storeu_si256(ob.qs.as_mut_ptr() as *mut __m256i, q8) };
            super::finish_block(ob, amax);
        }
    }
}

/// The AVX2 kernels with AVX-512 VNNI's `vpdpbusd` (256-bit form) for the lane sums.
#[cfg(target_arch = "x86_64")]
pub(crate) mod vnni {
    mod kernels {
        x86_kernels!(
            "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
            |u, s| { _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s) },
            4
        );
    }
    pub(crate) use kernels::matmul_rows;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Random weight rows of `ty` with finite scales.
    fn rows(ty: QType, n: usize, nb: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let bb = ty.block_bytes();
        let mut out = vec![0u8; n * nb * bb];
        for b in out.chunks_exact_mut(bb) {
            for v in b.iter_mut() {
                *v = next() as u8;
            }
            // The repacked k-quants: f32 scales (and minimum) of the sizes k-quants give.
            let small = |r: u64| (r % 2000) as f32 / 4e4 - 0.025;
            match ty {
                QType::Q4K => {
                    b[..4].copy_from_slice(&small(next()).abs().to_le_bytes());
                    b[4..8].copy_from_slice(&(-small(next()).abs() * 8.0).to_le_bytes());
                    continue;
                }
                QType::Q6K => {
                    b[..4].copy_from_slice(&small(next()).to_le_bytes());
                    b[4..8].copy_from_slice(&small(next()).to_le_bytes());
                    for v in &mut b[8..] {
                        *v = (((*v & 63) as i8) - 32) as u8;
                    }
                    continue;
                }
                _ => {}
            }
            let d = f16::from_f32((next() % 1000) as f32 / 1e4 - 0.05).to_bits();
            b[..2].copy_from_slice(&d.to_le_bytes());
            if ty == QType::Q4_1 {
                let m = f16::from_f32((next() % 1000) as f32 / 1e3 - 0.5).to_bits();
                b[2..4].copy_from_slice(&m.to_le_bytes());
            }
        }
        out
    }

    fn types() -> impl Strategy<Value = QType> {
        prop_oneof![
            Just(QType::Q4_0),
            Just(QType::Q4_1),
            Just(QType::Q8_0),
            Just(QType::Q5_0),
            Just(QType::Q4K),
            Just(QType::Q6K)
        ]
    }

    proptest! {
        #[test]
        fn matmul_is_bit_identical_to_the_scalar_reference(
            ty in types(), nb in 1usize..12, rows_n in 1usize..11, n_tok in 1usize..6,
            seed in any::<u64>(), xs in proptest::collection::vec(-8f32..8f32, 32 * 11 * 5),
        ) {
            let stride = nb * ty.block_bytes();
            let w = rows(ty, rows_n, nb, seed);
            let mut x = vec![Q8Block::default(); n_tok * nb];
            quantize_row(&xs[..n_tok * nb * QK], &mut x);
            let mut out = vec![0f32; rows_n * n_tok];
            matmul_rows(ty, &w, stride, rows_n, &x, nb, &mut out);
            let mut outs = vec![out];
            // Every x86 level this CPU has, called directly (isa() picks only the best).
            #[cfg(target_arch = "x86_64")]
            {
                let best = crate::native::kernels::detect();
                if best >= Isa::Avx2 {
                    let mut o = vec![0f32; rows_n * n_tok];
                    // SAFETY: the CPU has AVX2, FMA and F16C; shapes as matmul_rows checks.
                    unsafe { avx2::matmul_rows(ty, &w, stride, rows_n, &x, nb, &mut o) };
                    outs.push(o);
                }
                if best >= Isa::Avx512Vnni {
                    let mut o = vec![0f32; rows_n * n_tok];
                    // SAFETY: the CPU has AVX-512 F, VL and VNNI besides AVX2; shapes as above.
                    unsafe { vnni::matmul_rows(ty, &w, stride, rows_n, &x, nb, &mut o) };
                    outs.push(o);
                }
            }
            for out in &outs {
                for r in 0..rows_n {
                    for t in 0..n_tok {
                        let want = dot_scalar(ty, &w[r * stride..(r + 1) * stride], &x[t * nb..(t + 1) * nb]);
                        prop_assert_eq!(out[r * n_tok + t].to_bits(), want.to_bits(), "row {} token {}", r, t);
                    }
                }
            }
        }

        #[test]
        fn simd_quantisation_is_identical_to_the_scalar_reference(
            xs in proptest::collection::vec(-1e3f32..1e3f32, 32 * 4), scale in -20i32..20,
        ) {
            let xs: Vec<f32> = xs.iter().map(|v| v * 2f32.powi(scale)).collect();
            let mut a = vec![Q8Block::default(); 4];
            let mut b = vec![Q8Block::default(); 4];
            quantize_row(&xs, &mut a);
            quantize_row_scalar(&xs, &mut b);
            for (a, b) in a.iter().zip(&b) {
                prop_assert_eq!(a.qs, b.qs);
                prop_assert_eq!(a.d.to_bits(), b.d.to_bits());
                prop_assert_eq!(a.s.to_bits(), b.s.to_bits());
            }
        }

        #[test]
        fn integer_dot_matches_dequantised_float_dot(
            ty in types(), nb in 1usize..6, seed in any::<u64>(),
            xs in proptest::collection::vec(-4f32..4f32, 32 * 6),
        ) {
            let w = rows(ty, 1, nb, seed);
            let mut x = vec![Q8Block::default(); nb];
            quantize_row(&xs[..nb * QK], &mut x);
            let mut wf = vec![0f32; nb * QK];
            dequantize_row(ty, &w, &mut wf);
            let xf: Vec<f32> = x.iter().flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d)).collect();
            let mut want: f64 = wf.iter().zip(&xf).map(|(a, b)| *a as f64 * *b as f64).sum();
            if ty.has_min() {
                // The minimum term takes the block's own `s`, not `d·Σq` with `d` in f16.
                for (b, xb) in w.chunks_exact(ty.block_bytes()).zip(&x) {
                    let sum: i32 = xb.qs.iter().map(|&q| i32::from(q)).sum();
                    let m = weight_block(ty, b).2;
                    want += m as f64 * (xb.s as f64 - xb.d as f64 * sum as f64);
                }
            }
            let got = dot_scalar(ty, &w, &x) as f64;
            let scale: f64 = wf.iter().zip(&xf).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum::<f64>() + 1e-6;
            prop_assert!((got - want).abs() <= 1e-5 * scale, "got {got}, want {want}");
        }
    }

    #[test]
    fn activation_quantisation_is_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut q = vec![Q8Block::default(); 2];
        quantize_row(&x, &mut q);
        for (i, v) in x.iter().enumerate() {
            let b = &q[i / QK];
            // Half a step, plus the f16 rounding of the scale over 127 steps.
            assert!((f32::from(b.qs[i % QK]) * b.d - v).abs() <= b.d * 0.57 + 1e-6);
        }
        let mut zero = vec![Q8Block::default(); 1];
        quantize_row(&[0.0; 32], &mut zero);
        assert!(zero[0].qs.iter().all(|&q| q == 0) && zero[0].d == 0.0);
    }
}
