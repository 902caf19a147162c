//! Int8 matrix products against constant weights: `y = x · Wᵀ + b` with `W` quantised per
//! output channel and `x` quantised per row (per token) at run time.
//!
//! Weights are symmetric 7-bit integers (`-63..=63`) with one f32 scale per output column;
//! activations are asymmetric 8-bit (`0..=255`) with a scale and a zero point per row,
//! computed from that row alone. An optional per-input-channel smoothing vector `s`
//! (SmoothQuant) is folded into the weights (`W[:, i]·s[i]`) and divided out of the
//! activations before they are rounded, moving outlier channels' range into the weights.
//!
//! Why 7-bit weights: AVX2 has no u8×s8 dot product into 32 bits, only `vpmaddubsw`, which
//! adds two u8×s8 products into a *saturating* i16. With `|w| ≤ 63`, `2·255·63 < 2¹⁵`, so
//! it never saturates and every sum is exact.
//!
//! Determinism by construction: the dot product of a row and a column is an exact integer
//! sum (the same on every ISA level, for every blocking and thread count); the float
//! epilogue `(acc − zp·Σw)·(sx·sw) + b` is computed by one scalar routine on all paths; a
//! row's quantisation depends on that row only. So results are bit-identical across ISA
//! levels, thread counts and batch composition.

use super::gemm::{OutPtr, for_each_block};
use super::kernels::{Isa, isa};
use crate::threads::ThreadPool;

/// Largest weight magnitude (7-bit, see the module docs).
pub const WMAX: i32 = 63;
/// Output columns per panel (two AVX2 registers of i32 sums).
const NR: usize = 16;
/// Rows per micro-kernel tile (the AVX2 kernel takes them four at a time).
const MR: usize = 8;
/// Most rows per parallel task.
const MC: usize = 96;
/// Panels per parallel task.
const PANELS: usize = 4;

/// Quantise a weight matrix `w: [n, k]` (after multiplying column `i` by `smooth[i]`) per
/// output row: returns the int8 values (row-major `[n, k]`) and the per-row scales.
pub fn quantize_weights(w: &[f32], k: usize, smooth: Option<&[f32]>) -> (Vec<i8>, Vec<f32>) {
    assert!(k > 0 && w.len().is_multiple_of(k), "weight shape");
    let n = w.len() / k;
    let mut q = vec![0i8; n * k];
    let mut scales = vec![0f32; n];
    let mut row = vec![0f32; k];
    for j in 0..n {
        for (i, r) in row.iter_mut().enumerate() {
            *r = w[j * k + i] * smooth.map_or(1.0, |s| s[i]);
        }
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if max > 0.0 { max / WMAX as f32 } else { 1.0 };
        scales[j] = scale;
        for (d, v) in q[j * k..(j + 1) * k].iter_mut().zip(&row) {
            *d = (v / scale).round().clamp(-WMAX as f32, WMAX as f32) as i8;
        }
    }
    (q, scales)
}

/// Int8 weights `[n, k]` packed for the kernels, with scales, column sums and bias.
pub struct PackedI8 {
    /// `n.div_ceil(16)` panels of `k4 / 4` groups of 16 columns × 4 consecutive `k` values.
    data: Vec<i8>,
    /// Per output column: weight scale.
    scales: Vec<f32>,
    /// Per output column: sum of its integer weights (for the activation zero point).
    col_sums: Vec<i32>,
    bias: Vec<f32>,
    /// Per input channel: `1 / smooth`, applied to activations before rounding; 0 for the
    /// outlier channels (so they are left out of the row's range and contribute nothing).
    inv_smooth: Option<Vec<f32>>,
    /// Outlier input channels computed in f32 instead (their int8 weights are zero and
    /// their activations are left out of the row's range).
    outliers: Vec<usize>,
    /// Their float weights, `[outliers, n]` (one row of `n` per channel).
    outlier_w: Vec<f32>,
    n: usize,
    k: usize,
    /// `k` rounded up to 4 (the packing pads with zero weights).
    k4: usize,
}

impl PackedI8 {
    /// Pack quantised weights `q: [n, k]` with their per-row `scales`, `bias: [n]`, the
    /// smoothing vector they were quantised with (if any), and the outlier channels kept in
    /// float with their weights `[n, outliers]` (row-major, as stored).
    pub fn new(
        q: &[i8],
        scales: &[f32],
        bias: &[f32],
        k: usize,
        smooth: Option<&[f32]>,
        outliers: (&[usize], &[f32]),
    ) -> PackedI8 {
        let n = bias.len();
        assert_eq!(q.len(), n * k, "weight shape");
        assert_eq!(scales.len(), n, "scales shape");
        let (channels, ow) = outliers;
        let t = channels.len();
        assert!(
            channels.iter().all(|&c| c < k) && ow.len() == n * t,
            "outlier shape"
        );
        let outlier_w: Vec<f32> = (0..t)
            .flat_map(|i| (0..n).map(move |j| ow[j * t + i]))
            .collect();
        assert!(
            q.iter().all(|&v| (v as i32).abs() <= WMAX),
            "weights beyond 7 bits"
        );
        let k4 = k.next_multiple_of(4);
        let panels = n.div_ceil(NR);
        let mut data = vec![0i8; panels * k4 * NR];
        for j in 0..n {
            let (p, c) = (j / NR, j % NR);
            for i in 0..k {
                let (g, b) = (i / 4, i % 4);
                data[p * k4 * NR + g * 4 * NR + c * 4 + b] = q[j * k + i];
            }
        }
        PackedI8 {
            data,
            scales: scales.to_vec(),
            col_sums: (0..n)
                .map(|j| q[j * k..(j + 1) * k].iter().map(|&v| v as i32).sum())
                .collect(),
            bias: bias.to_vec(),
            inv_smooth: (smooth.is_some() || !channels.is_empty()).then(|| {
                (0..k)
                    .map(|i| match smooth {
                        _ if channels.contains(&i) => 0.0,
                        Some(s) => 1.0 / s[i],
                        None => 1.0,
                    })
                    .collect()
            }),
            outliers: channels.to_vec(),
            outlier_w,
            n,
            k,
            k4,
        }
    }

    /// Output width.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn k(&self) -> usize {
        self.k
    }

    /// `out = x · Wᵀ + b` for `x: [rows, k]`, `out: [rows, n]`, on `pool`.
    pub fn matmul(&self, x: &[f32], out: &mut [f32], pool: &ThreadPool) {
        self.matmul_at(isa(), x, out, pool);
    }

    /// [`PackedI8::matmul`] on the given ISA level (at most what the CPU has): the same bits
    /// on every level.
    fn matmul_at(&self, level: Isa, x: &[f32], out: &mut [f32], pool: &ThreadPool) {
        assert!(
            level <= super::kernels::detect(),
            "{level:?} is beyond this CPU"
        );
        let (n, k, k4) = (self.n, self.k, self.k4);
        assert!(k > 0 && x.len().is_multiple_of(k), "input shape");
        let rows = x.len() / k;
        assert_eq!(out.len(), rows * n, "output shape");
        if rows == 0 || n == 0 {
            return;
        }
        // Quantise every row on its own (scale, zero point), in parallel by row blocks.
        let mut xq = vec![0u8; rows * k4];
        let mut params = vec![(0f32, 0i32); rows];
        {
            let per = 16;
            let mut pairs: Vec<RowBlock> = xq
                .chunks_mut(per * k4)
                .zip(params.chunks_mut(per))
                .collect();
            pool.for_each_chunk(&mut pairs, 1, |b, c| {
                let (q, p) = &mut c[0];
                for (r, (qr, pr)) in q.chunks_exact_mut(k4).zip(p.iter_mut()).enumerate() {
                    let row = b * per + r;
                    let xr = &x[row * k..(row + 1) * k];
                    *pr = quantize_row(xr, self.inv_smooth.as_deref(), qr);
                }
            });
        }
        let panels = n.div_ceil(NR);
        let dst = OutPtr(out.as_mut_ptr());
        let (xq, params) = (&xq, &params);
        for_each_block(pool, rows, panels, (MR, MC, PANELS), |r0, nr, group| {
            let xs = &xq[r0 * k4..(r0 + nr) * k4];
            #[cfg(target_arch = "x86_64")]
            if level >= Isa::Avx512 {
                let rows = Rows {
                    q: xs,
                    params: &params[r0..r0 + nr],
                    x: &x[r0 * k..(r0 + nr) * k],
                };
                let end = group.end;
                for p in group.step_by(2) {
                    // Two panels at a time (one if the group has an odd count).
                    let count = 2.min(end - p);
                    // SAFETY: the level is at most the CPU's (asserted), so it has AVX-512 F
                    // and BW (and VNNI at Avx512Vnni). Rows r0..r0 + nr and the panels'
                    // columns are inside `out`, and this task owns those (row, panel) pairs.
                    unsafe {
                        let out = dst.at(r0 * n);
                        if level == Isa::Avx512Vnni {
                            avx512::vnni::panels(self, &rows, p, count, out);
                        } else {
                            avx512::bw::panels(self, &rows, p, count, out);
                        }
                    }
                }
                return;
            }
            let mut sums = vec![[0i32; NR]; nr];
            for p in group {
                // The epilogue below writes the block's rows of this panel.
                super::gemm::prefetch_out(dst.at(r0 * n + p * NR), n, nr, NR.min(n - p * NR));
                let w = &self.data[p * k4 * NR..][..k4 * NR];
                let mut r = 0;
                while r < nr {
                    let m = MR.min(nr - r);
                    tile_at(level, &xs[r * k4..(r + m) * k4], k4, w, &mut sums[r..r + m]);
                    r += m;
                }
                let j0 = p * NR;
                let cols = NR.min(n - j0);
                for (i, s) in sums.iter().enumerate() {
                    // SAFETY: row r0 + i < rows and columns j0..j0 + cols <= n: inside `out`,
                    // and this task owns the (row, panel) pair.
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(dst.at((r0 + i) * n + j0), cols) };
                    let (sx, zp) = params[r0 + i];
                    finish_row(
                        s,
                        (zp, sx),
                        (
                            &self.col_sums[j0..j0 + cols],
                            &self.scales[j0..j0 + cols],
                            &self.bias[j0..j0 + cols],
                        ),
                        Outliers {
                            x: &x[(r0 + i) * k..(r0 + i + 1) * k],
                            channels: &self.outliers,
                            w: &self.outlier_w,
                            n,
                            j0,
                        },
                        row,
                    );
                }
            }
        });
    }
}

/// The float result of one output element from its exact integer sum (the canonical
/// formula; the AVX2 path computes the same operations eight columns at a time).
#[inline]
fn epilogue(acc: i32, zp: i32, col_sum: i32, sx: f32, sw: f32, bias: f32) -> f32 {
    ((acc - zp * col_sum) as f32).mul_add(sx * sw, bias)
}

/// The rows of one task: quantised, their `(scale, zero point)`s, and as given (for the
/// outlier channels).
#[cfg(target_arch = "x86_64")]
struct Rows<'a> {
    /// `rows × k4` bytes.
    q: &'a [u8],
    params: &'a [(f32, i32)],
    /// `rows × k` floats.
    x: &'a [f32],
}

/// A row's outlier channels, computed in float after the integer part.
struct Outliers<'a> {
    /// The row's (unquantised) activations.
    x: &'a [f32],
    /// Channel indices, ascending.
    channels: &'a [usize],
    /// Their weights, `[channels, n]`.
    w: &'a [f32],
    n: usize,
    /// First column of the panel.
    j0: usize,
}

/// One row of a panel (`out.len()` ≤ 16 columns): [`epilogue`], then each outlier channel
/// in order as one FMA per element, `y = fma(x[c], w[c][j], y)`. The AVX2 path does the
/// same operations in registers.
fn finish_row(
    s: &[i32; NR],
    (zp, sx): (i32, f32),
    (col_sums, scales, bias): (&[i32], &[f32], &[f32]),
    o: Outliers,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if isa() >= Isa::Avx2 && out.len() == NR {
        // SAFETY: AVX2 and FMA present; every slice holds 16 elements, and each outlier
        // row of `o.w` has 16 columns from `o.j0` (the panel is full).
        unsafe { avx2::finish_row(s, zp, sx, col_sums, scales, bias, &o, out) };
        return;
    }
    for (c, d) in out.iter_mut().enumerate() {
        *d = epilogue(s[c], zp, col_sums[c], sx, scales[c], bias[c]);
    }
    for (t, &ch) in o.channels.iter().enumerate() {
        let w = &o.w[t * o.n + o.j0..][..out.len()];
        for (d, w) in out.iter_mut().zip(w) {
            *d = o.x[ch].mul_add(*w, *d);
        }
    }
}

/// Quantise one row to `0..=255` with its own scale and zero point (the range always holds
/// 0, so zero is exact); `out` is `k` rounded up to 4, the tail the zero point. Returns
/// `(scale, zp)`.
///
/// Canonical arithmetic (the AVX2 path does exactly this, eight elements at a time):
/// `v = x·inv_smooth`; range by `if v < lo { v } else { lo }` (and `>` for the top) from
/// 0; `q = clamp(round_ties_even(v·inv_scale + zp), 0, 255)` with a separate multiply and
/// add.
pub fn quantize_row(x: &[f32], inv_smooth: Option<&[f32]>, out: &mut [u8]) -> (f32, i32) {
    assert!(out.len() >= x.len() && inv_smooth.is_none_or(|s| s.len() == x.len()));
    let (lo, hi) = row_range(x, inv_smooth);
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    let inv = 1.0 / scale;
    let zp = (-lo * inv).round_ties_even().clamp(0.0, 255.0);
    #[cfg(target_arch = "x86_64")]
    if isa() >= Isa::Avx2 {
        // SAFETY: AVX2 present; lengths asserted above.
        unsafe { avx2::quantize(x, inv_smooth, inv, zp, out) };
        out[x.len()..].fill(zp as u8);
        return (scale, zp as i32);
    }
    for (i, (d, &v)) in out.iter_mut().zip(x).enumerate() {
        let v = inv_smooth.map_or(v, |s| v * s[i]);
        *d = (v * inv + zp).round_ties_even().clamp(0.0, 255.0) as u8;
    }
    out[x.len()..].fill(zp as u8);
    (scale, zp as i32)
}

/// The smallest and largest (smoothed) value of a row, starting from 0.
fn row_range(x: &[f32], inv_smooth: Option<&[f32]>) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if isa() >= Isa::Avx2 {
        // SAFETY: AVX2 present; `inv_smooth` has x's length (asserted by the caller).
        return unsafe { avx2::range(x, inv_smooth) };
    }
    let (mut lo, mut hi) = (0f32, 0f32);
    for (i, &v) in x.iter().enumerate() {
        let v = inv_smooth.map_or(v, |s| v * s[i]);
        lo = if v < lo { v } else { lo };
        hi = if v > hi { v } else { hi };
    }
    (lo, hi)
}

/// A block of quantised rows and their `(scale, zero point)`s, written by one task.
type RowBlock<'a> = (&'a mut [u8], &'a mut [(f32, i32)]);

/// Integer sums of up to [`MR`] rows of `x` (`k4` bytes each) against one panel `w`, on
/// the given ISA level (at most [`kernels::detect`](super::kernels::detect)'s).
fn tile_at(level: Isa, x: &[u8], k4: usize, w: &[i8], sums: &mut [[i32; NR]]) {
    let m = sums.len();
    assert!((1..=MR).contains(&m) && x.len() == m * k4 && w.len() == k4 * NR);
    assert!(
        level <= super::kernels::detect(),
        "{level:?} is beyond this CPU"
    );
    #[cfg(target_arch = "x86_64")]
    match level {
        // SAFETY (both arms): the level is at most what the CPU has (asserted), so it has
        // AVX-512 F and BW (and VNNI for the second); bounds asserted above.
        Isa::Avx512 => {
            unsafe { avx512::bw::tiles(x, k4, w, sums) };
            return;
        }
        Isa::Avx512Vnni => {
            unsafe { avx512::vnni::tiles(x, k4, w, sums) };
            return;
        }
        Isa::Avx2 => {
            for (i, s) in sums.chunks_mut(4).enumerate() {
                let x = &x[i * 4 * k4..][..s.len() * k4];
                // SAFETY: the CPU has AVX2 (asserted level); `x` holds the chunk's rows and
                // `w` a whole panel (asserted above).
                unsafe {
                    match s.len() {
                        4 => avx2::tile::<4>(x, k4, w, s),
                        3 => avx2::tile::<3>(x, k4, w, s),
                        2 => avx2::tile::<2>(x, k4, w, s),
                        _ => avx2::tile::<1>(x, k4, w, s),
                    }
                }
            }
            return;
        }
        Isa::Scalar => {}
    }
    tile_scalar(x, k4, w, sums);
}

/// The scalar reference of [`tile`].
fn tile_scalar(x: &[u8], k4: usize, w: &[i8], sums: &mut [[i32; NR]]) {
    for (r, s) in sums.iter_mut().enumerate() {
        let xr = &x[r * k4..(r + 1) * k4];
        *s = [0; NR];
        for g in 0..k4 / 4 {
            for (c, acc) in s.iter_mut().enumerate() {
                for b in 0..4 {
                    *acc += xr[g * 4 + b] as i32 * w[g * 4 * NR + c * 4 + b] as i32;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {

    /// Defines module `$module` with `tiles` (integer sums of up to [`MR`] rows × 16 columns
    /// into `sums`; the tile test holds them to the scalar sums) and `panels` (one or two panels for a
    /// task's rows, with the epilogue fused), one 512-bit register of i32 sums per row and
    /// panel, `$step(acc, x broadcast, w)` per row and group of four `k`. Both steps below
    /// give the same exact integer sums, and the epilogue is the canonical one
    /// ([`super::finish_row`]) sixteen columns at a time.
    macro_rules! kernels {
        ($module:ident, $features:literal, $step:expr) => {
            pub mod $module {
                use std::arch::x86_64::*;

                use super::super::{MR, NR, PackedI8, Rows};

                /// The sums of `R` rows (`k4` bytes each, from `x`) against `P` panels `w`.
                #[inline]
                #[target_feature(enable = $features)]
                fn sums<const R: usize, const P: usize>(
                    x: &[u8],
                    k4: usize,
                    w: [&[i8]; P],
                    ahead: Option<&[i8]>,
                ) -> [[__m512i; P]; R] {
                    assert!(R <= MR && x.len() >= R * k4 && k4.is_multiple_of(4));
                    assert!(w.iter().all(|w| w.len() >= k4 * NR));
                    let mut acc = [[_mm512_setzero_si512(); P]; R];
                    let xp = x.as_ptr();
                    for g in 0..k4 / 4 {
                        // SAFETY: group g (64 bytes) is inside each panel (k4 / 4 groups),
                        // and each row's 4-byte read at 4g is inside its k4 bytes (asserted
                        // above).
                        unsafe {
                            if let Some(a) = ahead {
                                // The next panels' group g (a hint: never faults, and the
                                // results do not depend on it).
                                for i in 0..P {
                                    let at = a.as_ptr().wrapping_add(i * k4 * NR + g * 64);
                                    _mm_prefetch::<_MM_HINT_T1>(at);
                                }
                            }
                            let wv =
                                w.map(|w| _mm512_loadu_si512(w.as_ptr().add(g * 64) as *const _));
                            for (r, a) in acc.iter_mut().enumerate() {
                                let xv = (xp.add(r * k4 + g * 4) as *const i32).read_unaligned();
                                let xb = _mm512_set1_epi32(xv);
                                for (a, wv) in a.iter_mut().zip(wv) {
                                    *a = $step(*a, xb, wv);
                                }
                            }
                        }
                    }
                    acc
                }

                /// # Safety
                /// The CPU must have the features named in `target_feature`;
                /// `x.len() == out.len() * k4`, `out.len() <= MR`, `w.len() >= k4 * 16`,
                /// `k4 % 4 == 0`.
                #[target_feature(enable = $features)]
                pub unsafe fn tiles(x: &[u8], k4: usize, w: &[i8], out: &mut [[i32; NR]]) {
                    #[inline]
                    #[target_feature(enable = $features)]
                    fn store<const R: usize>(x: &[u8], k4: usize, w: &[i8], out: &mut [[i32; NR]]) {
                        assert_eq!(out.len(), R);
                        for (a, s) in sums::<R, 1>(x, k4, [w], None).iter().zip(out.iter_mut()) {
                            // SAFETY: each `s` holds 16 i32.
                            unsafe { _mm512_storeu_si512(s.as_mut_ptr() as *mut _, a[0]) };
                        }
                    }
                    match out.len() {
                        8 => store::<8>(x, k4, w, out),
                        7 => store::<7>(x, k4, w, out),
                        6 => store::<6>(x, k4, w, out),
                        5 => store::<5>(x, k4, w, out),
                        4 => store::<4>(x, k4, w, out),
                        3 => store::<3>(x, k4, w, out),
                        2 => store::<2>(x, k4, w, out),
                        _ => store::<1>(x, k4, w, out),
                    }
                }

                /// Panels `p..p + P` (`P` = `panels`, 1 or 2) of `m` for every row of `rows`,
                /// written to `out` (row `i` at `out + i·n + 16p`), the epilogue applied in
                /// registers. Two panels at once share each row's activation broadcast.
                ///
                /// # Safety
                /// The CPU must have the features named in `target_feature`; the panels
                /// exist in `m`; `rows` is consistent (`q`: rows × k4 bytes, `x`: rows × k
                /// floats); `out` points at `rows × n` writable floats.
                #[target_feature(enable = $features)]
                pub unsafe fn panels(
                    m: &PackedI8,
                    rows: &Rows,
                    p: usize,
                    panels: usize,
                    out: *mut f32,
                ) {
                    /// One panel's epilogue for row `r` of the task: `acc` to floats at
                    /// `out + r·n + 16p`.
                    #[inline]
                    #[target_feature(enable = $features)]
                    fn finish(
                        m: &PackedI8,
                        rows: &Rows,
                        p: usize,
                        r: usize,
                        acc: __m512i,
                        out: *mut f32,
                    ) {
                        let (n, k) = (m.n, m.k);
                        let j0 = p * NR;
                        let cols = NR.min(n - j0);
                        let mask: __mmask16 = ((1u32 << cols) - 1) as u16;
                        // SAFETY: masked loads read only columns j0..j0 + cols < n of each
                        // per-column vector and of each outlier row.
                        let (cs, sw, bias) = unsafe {
                            (
                                _mm512_maskz_loadu_epi32(
                                    mask,
                                    m.col_sums.as_ptr().add(j0) as *const _,
                                ),
                                _mm512_maskz_loadu_ps(mask, m.scales.as_ptr().add(j0)),
                                _mm512_maskz_loadu_ps(mask, m.bias.as_ptr().add(j0)),
                            )
                        };
                        let (sx, zp) = rows.params[r];
                        let exact =
                            _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(zp), cs));
                        let scale = _mm512_mul_ps(_mm512_set1_ps(sx), sw);
                        let mut y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, bias);
                        let xr = &rows.x[r * k..][..k];
                        for (t, &c) in m.outliers.iter().enumerate() {
                            // SAFETY: as above, columns j0..j0 + cols of outlier row t.
                            let ow = unsafe {
                                _mm512_maskz_loadu_ps(mask, m.outlier_w.as_ptr().add(t * n + j0))
                            };
                            y = _mm512_fmadd_ps(_mm512_set1_ps(xr[c]), ow, y);
                        }
                        // SAFETY: row r of the task's rows, columns j0..j0 + cols: inside the
                        // caller's `out` (rows × n).
                        unsafe { _mm512_mask_storeu_ps(out.add(r * n + j0), mask, y) };
                    }

                    #[inline]
                    #[target_feature(enable = $features)]
                    fn block<const R: usize, const P: usize>(
                        m: &PackedI8,
                        rows: &Rows,
                        p: usize,
                        r: usize,
                        out: *mut f32,
                    ) {
                        let k4 = m.k4;
                        let w: [&[i8]; P] =
                            std::array::from_fn(|i| &m.data[(p + i) * k4 * NR..][..k4 * NR]);
                        // The first tile pulls the next panels towards L2: with one sequence
                        // each panel serves only a few tiles, and the weights come from L3.
                        let ahead = m.data.get((p + P) * k4 * NR..).filter(|_| r == 0);
                        // The tile's output lines are fetched while it computes.
                        for j in 0..P {
                            let at = out.wrapping_add(r * m.n + (p + j) * NR);
                            crate::native::gemm::prefetch_out(at, m.n, R, NR);
                        }
                        let acc = sums::<R, P>(&rows.q[r * k4..], k4, w, ahead);
                        for (i, a) in acc.iter().enumerate() {
                            for (j, a) in a.iter().enumerate() {
                                finish(m, rows, p + j, r + i, *a, out);
                            }
                        }
                    }

                    #[inline]
                    #[target_feature(enable = $features)]
                    fn run<const P: usize>(m: &PackedI8, rows: &Rows, p: usize, out: *mut f32) {
                        let nr = rows.params.len();
                        let mut r = 0;
                        while r < nr {
                            let t = MR.min(nr - r);
                            match t {
                                8 => block::<8, P>(m, rows, p, r, out),
                                7 => block::<7, P>(m, rows, p, r, out),
                                6 => block::<6, P>(m, rows, p, r, out),
                                5 => block::<5, P>(m, rows, p, r, out),
                                4 => block::<4, P>(m, rows, p, r, out),
                                3 => block::<3, P>(m, rows, p, r, out),
                                2 => block::<2, P>(m, rows, p, r, out),
                                _ => block::<1, P>(m, rows, p, r, out),
                            }
                            r += t;
                        }
                    }

                    let nr = rows.params.len();
                    assert!(rows.q.len() == nr * m.k4 && rows.x.len() == nr * m.k);
                    assert!((1..=2).contains(&panels) && p + panels <= m.n.div_ceil(NR));
                    if panels == 2 {
                        run::<2>(m, rows, p, out);
                    } else {
                        run::<1>(m, rows, p, out);
                    }
                }
            }
        };
    }

    // `vpmaddubsw` (u8 × s8 pairs into i16, exact for 7-bit weights) then `vpmaddwd` by ones.
    kernels!(bw, "avx512f,avx512bw", |a, x, w| _mm512_add_epi32(
        a,
        _mm512_madd_epi16(_mm512_maddubs_epi16(x, w), _mm512_set1_epi16(1))
    ));
    // `vpdpbusd`: four u8 × s8 products added into each i32 lane.
    kernels!(vnni, "avx512f,avx512bw,avx512vnni", |a, x, w| {
        _mm512_dpbusd_epi32(a, x, w)
    });
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::NR;

    /// `R` rows × 16 columns; `vpmaddubsw` (u8 × s8, pairs into i16 — exact for 7-bit
    /// weights) then `vpmaddwd` by ones into i32.
    ///
    /// # Safety
    /// AVX2 must be available; `x.len() >= R * k4`, `w.len() >= k4 * 16`, `k4 % 4 == 0`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn tile<const R: usize>(x: &[u8], k4: usize, w: &[i8], sums: &mut [[i32; NR]]) {
        assert!(sums.len() == R && x.len() >= R * k4 && w.len() >= k4 * NR && k4.is_multiple_of(4));
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        for g in 0..k4 / 4 {
            // SAFETY: group g (64 bytes) is inside w (k4 / 4 groups), and each row's 4-byte
            // read at 4g is inside its k4 bytes.
            unsafe {
                let w0 = _mm256_loadu_si256(wp.add(g * 64) as *const __m256i);
                let w1 = _mm256_loadu_si256(wp.add(g * 64 + 32) as *const __m256i);
                for (r, a) in acc.iter_mut().enumerate() {
                    let xb =
                        _mm256_set1_epi32((xp.add(r * k4 + g * 4) as *const i32).read_unaligned());
                    a[0] = _mm256_add_epi32(
                        a[0],
                        _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w0), ones),
                    );
                    a[1] = _mm256_add_epi32(
                        a[1],
                        _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w1), ones),
                    );
                }
            }
        }
        for (a, s) in acc.iter().zip(sums.iter_mut()) {
            // SAFETY: each `s` holds 16 i32.
            unsafe {
                _mm256_storeu_si256(s.as_mut_ptr() as *mut __m256i, a[0]);
                _mm256_storeu_si256(s.as_mut_ptr().add(8) as *mut __m256i, a[1]);
            }
        }
    }

    /// [`super::epilogue`] for 16 columns.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; every slice holds 16 elements.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn finish_row(
        s: &[i32; NR],
        zp: i32,
        sx: f32,
        col_sums: &[i32],
        scales: &[f32],
        bias: &[f32],
        o: &super::Outliers,
        out: &mut [f32],
    ) {
        assert!(col_sums.len() == NR && scales.len() == NR && bias.len() == NR && out.len() == NR);
        assert!(o.w.len() >= o.channels.len() * o.n && o.j0 + NR <= o.n);
        let (zpv, sxv) = (_mm256_set1_epi32(zp), _mm256_set1_ps(sx));
        let mut y = [_mm256_setzero_ps(); 2];
        for (h, y) in y.iter_mut().enumerate() {
            // SAFETY: h * 8 + 8 <= 16 elements of every slice.
            unsafe {
                let acc = _mm256_loadu_si256(s.as_ptr().add(h * 8) as *const __m256i);
                let cs = _mm256_loadu_si256(col_sums.as_ptr().add(h * 8) as *const __m256i);
                let exact = _mm256_sub_epi32(acc, _mm256_mullo_epi32(zpv, cs));
                let f = _mm256_cvtepi32_ps(exact);
                let m = _mm256_mul_ps(sxv, _mm256_loadu_ps(scales.as_ptr().add(h * 8)));
                *y = _mm256_fmadd_ps(f, m, _mm256_loadu_ps(bias.as_ptr().add(h * 8)));
            }
        }
        for (t, &c) in o.channels.iter().enumerate() {
            let xb = _mm256_set1_ps(o.x[c]);
            // SAFETY: outlier row t's columns j0 .. j0 + 16 are inside its n (asserted).
            unsafe {
                let w = o.w.as_ptr().add(t * o.n + o.j0);
                y[0] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w), y[0]);
                y[1] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w.add(8)), y[1]);
            }
        }
        // SAFETY: `out` holds 16 floats.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), y[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), y[1]);
        }
    }

    /// Elements `i..i + 8` of `x`, times `inv_smooth`'s if given.
    ///
    /// # Safety
    /// AVX2 must be available; `i + 8 <= x.len()` (and `inv_smooth`'s length).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_smoothed(x: &[f32], inv_smooth: Option<&[f32]>, i: usize) -> __m256 {
        // SAFETY: guaranteed by the caller.
        unsafe {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            match inv_smooth {
                Some(s) => _mm256_mul_ps(v, _mm256_loadu_ps(s.as_ptr().add(i))),
                None => v,
            }
        }
    }

    /// [`super::row_range`], eight lanes at a time (min and max are exact, so the lane
    /// order does not matter).
    ///
    /// # Safety
    /// AVX2 must be available; `inv_smooth`, if given, has `x`'s length.
    #[target_feature(enable = "avx2")]
    pub unsafe fn range(x: &[f32], inv_smooth: Option<&[f32]>) -> (f32, f32) {
        assert!(inv_smooth.is_none_or(|s| s.len() == x.len()));
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let n8 = x.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 <= x.len() (and inv_smooth's length).
            unsafe {
                let v = load_smoothed(x, inv_smooth, i);
                // min_ps(a, b) is `a < b ? a : b`, as in the scalar loop.
                lo = _mm256_min_ps(v, lo);
                hi = _mm256_max_ps(v, hi);
            }
        }
        let (mut l, mut h) = ([0f32; 8], [0f32; 8]);
        // SAFETY: 8 floats each.
        unsafe {
            _mm256_storeu_ps(l.as_mut_ptr(), lo);
            _mm256_storeu_ps(h.as_mut_ptr(), hi);
        }
        let (mut lo, mut hi) = (0f32, 0f32);
        for i in 0..8 {
            lo = if l[i] < lo { l[i] } else { lo };
            hi = if h[i] > hi { h[i] } else { hi };
        }
        for i in n8..x.len() {
            let v = inv_smooth.map_or(x[i], |s| x[i] * s[i]);
            lo = if v < lo { v } else { lo };
            hi = if v > hi { v } else { hi };
        }
        (lo, hi)
    }

    /// The quantisation step of [`super::quantize_row`], eight elements at a time.
    ///
    /// # Safety
    /// AVX2 must be available; `out.len() >= x.len()`; `inv_smooth`, if given, has `x`'s
    /// length.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize(
        x: &[f32],
        inv_smooth: Option<&[f32]>,
        inv: f32,
        zp: f32,
        out: &mut [u8],
    ) {
        assert!(out.len() >= x.len() && inv_smooth.is_none_or(|s| s.len() == x.len()));
        let (invv, zpv) = (_mm256_set1_ps(inv), _mm256_set1_ps(zp));
        let (zero, top) = (_mm256_setzero_ps(), _mm256_set1_ps(255.0));
        let n8 = x.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 <= x.len() <= out.len() (and inv_smooth's length).
            unsafe {
                let v = load_smoothed(x, inv_smooth, i);
                let t = _mm256_add_ps(_mm256_mul_ps(v, invv), zpv);
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
                let c = _mm256_min_ps(_mm256_max_ps(r, zero), top);
                let q = _mm256_cvtps_epi32(c);
                let w16 =
                    _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
                let b8 = _mm_packus_epi16(w16, _mm_setzero_si128());
                _mm_storel_epi64(out.as_mut_ptr().add(i) as *mut __m128i, b8);
            }
        }
        for i in n8..x.len() {
            let v = inv_smooth.map_or(x[i], |s| x[i] * s[i]);
            out[i] = (v * inv + zp).round_ties_even().clamp(0.0, 255.0) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        }
    }

    proptest! {
        #[test]
        fn simd_tile_equals_the_scalar_reference_and_exact_sums(
            m in 1usize..=MR, groups in 1usize..40, seed in any::<u64>(), extreme in any::<bool>()
        ) {
            let k4 = groups * 4;
            let mut next = rng(seed);
            // Extremes (255 × ±63 everywhere) are where a saturating i16 would show.
            let x: Vec<u8> = (0..m * k4).map(|_| if extreme { 255 } else { ((next() + 0.5) * 255.0) as u8 }).collect();
            let w: Vec<i8> = (0..k4 * NR).map(|i| if extreme { if i % 3 == 0 { -63 } else { 63 } } else { (next() * 126.0).round() as i8 }).collect();
            let mut want = vec![[0i32; NR]; m];
            tile_scalar(&x, k4, &w, &mut want);
            // Every level this CPU has (the scalar arm included).
            for level in [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni] {
                if level <= crate::native::kernels::detect() {
                    let mut got = vec![[7i32; NR]; m];
                    tile_at(level, &x, k4, &w, &mut got);
                    prop_assert_eq!(&got, &want, "{:?}", level);
                }
            }
            for r in 0..m {
                for c in 0..NR {
                    let exact: i64 = (0..k4).map(|i| x[r * k4 + i] as i64 * w[(i / 4) * 4 * NR + c * 4 + i % 4] as i64).sum();
                    prop_assert_eq!(want[r][c] as i64, exact);
                }
            }
        }

        #[test]
        fn simd_quantisation_and_epilogue_equal_the_scalar_reference(
            k in 1usize..80, seed in any::<u64>(), smooth in any::<bool>(), spread in 0.01f32..100.0
        ) {
            let mut next = rng(seed);
            let x: Vec<f32> = (0..k).map(|_| next() * spread).collect();
            let s: Vec<f32> = (0..k).map(|_| next() + 1.0).collect();
            let sm = smooth.then_some(&s[..]);
            let mut got = vec![0u8; k.next_multiple_of(4)];
            let (scale, zp) = quantize_row(&x, sm, &mut got);
            let mut lo = 0f32;
            let mut hi = 0f32;
            for (i, v) in x.iter().enumerate() {
                let v = sm.map_or(*v, |s| v * s[i]);
                lo = lo.min(v);
                hi = hi.max(v);
            }
            prop_assert_eq!(row_range(&x, sm), (lo, hi));
            let inv = 1.0 / scale;
            for (i, v) in x.iter().enumerate() {
                let v = sm.map_or(*v, |s| v * s[i]);
                let want = (v * inv + zp as f32).round_ties_even().clamp(0.0, 255.0) as u8;
                prop_assert_eq!(got[i], want, "element {}", i);
            }
            let acc: [i32; NR] = std::array::from_fn(|_| (next() * 2e6) as i32);
            let cs: Vec<i32> = (0..NR).map(|_| (next() * 2e3) as i32).collect();
            let sw: Vec<f32> = (0..NR).map(|_| next().abs() * 0.01).collect();
            let b: Vec<f32> = (0..NR).map(|_| next()).collect();
            // Two outlier channels of a 32-column matrix, second panel.
            let ox: Vec<f32> = (0..k.max(2)).map(|_| next()).collect();
            let ow: Vec<f32> = (0..2 * 32).map(|_| next()).collect();
            let channels = [0, k.max(2) - 1];
            let mut out = vec![0f32; NR];
            let o = Outliers { x: &ox, channels: &channels, w: &ow, n: 32, j0: 16 };
            finish_row(&acc, (zp, scale), (&cs, &sw, &b), o, &mut out);
            for c in 0..NR {
                let mut want = epilogue(acc[c], zp, cs[c], scale, sw[c], b[c]);
                for (t, &ch) in channels.iter().enumerate() {
                    want = ox[ch].mul_add(ow[t * 32 + 16 + c], want);
                }
                prop_assert_eq!(out[c].to_bits(), want.to_bits());
            }
        }

        #[test]
        fn matmul_is_identical_across_threads_and_batch_and_close_to_f32(
            rows in 1usize..40, k in 1usize..70, n in 1usize..40, seed in any::<u64>(), smooth in any::<bool>(),
            n_out in 0usize..3
        ) {
            let mut next = rng(seed);
            let x: Vec<f32> = (0..rows * k).map(|_| next() * 4.0).collect();
            let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let s: Vec<f32> = (0..k).map(|_| next() + 1.0).collect();
            let sm = smooth.then_some(&s[..]);
            // Outlier channels: float weights [n, t], zero in the int8 weights.
            let channels: Vec<usize> = (0..n_out.min(k)).map(|i| i * (k - 1) / 2).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            let ow: Vec<f32> = (0..n).flat_map(|j| channels.iter().map(move |&c| (j, c))).map(|(j, c)| w[j * k + c]).collect();
            let mut wz = w.clone();
            for j in 0..n { for &c in &channels { wz[j * k + c] = 0.0; } }
            let (q, scales) = quantize_weights(&wz, k, sm);
            let p = PackedI8::new(&q, &scales, &b, k, sm, (&channels, &ow));
            let mut one = vec![0f32; rows * n];
            let mut two = vec![0f32; rows * n];
            p.matmul(&x, &mut one, &ThreadPool::new(1).unwrap());
            p.matmul(&x, &mut two, &ThreadPool::new(2).unwrap());
            prop_assert_eq!(&one, &two);
            // Every ISA level this CPU has gives the scalar path's bits (the AVX-512 levels
            // fuse the epilogue into the tile).
            let mut scalar = vec![0f32; rows * n];
            p.matmul_at(Isa::Scalar, &x, &mut scalar, &ThreadPool::new(1).unwrap());
            for level in [Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni] {
                if level <= crate::native::kernels::detect() {
                    let mut got = vec![0f32; rows * n];
                    p.matmul_at(level, &x, &mut got, &ThreadPool::new(2).unwrap());
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    prop_assert_eq!(bits(&got), bits(&scalar), "{:?}", level);
                }
            }
            let last = rows - 1;
            let mut alone = vec![0f32; n];
            p.matmul(&x[last * k..], &mut alone, &ThreadPool::new(1).unwrap());
            prop_assert_eq!(&alone[..], &one[last * n..]);
            // Against the float product: error bounded by the two quantisation steps.
            for r in 0..rows {
                let xr = &x[r * k..(r + 1) * k];
                let xmax = xr.iter().fold(0f32, |m, v| m.max(v.abs()));
                for j in 0..n {
                    let exact: f32 = (0..k).map(|i| xr[i] * w[j * k + i]).sum::<f32>() + b[j];
                    let wmax = (0..k).map(|i| (w[j * k + i] * sm.map_or(1.0, |s| s[i])).abs()).fold(0f32, f32::max);
                    let bound = k as f32 * (xmax * 2.0 * wmax / 63.0 + 2.0 * xmax / 255.0 * wmax) + 1e-4;
                    prop_assert!((one[r * n + j] - exact).abs() <= bound, "{} vs {}", one[r * n + j], exact);
                }
            }
        }
    }

    #[test]
    fn a_row_of_zeros_and_a_constant_row_quantise_without_dividing_by_zero() {
        let mut out = [0u8; 4];
        assert_eq!(quantize_row(&[0.0; 3], None, &mut out), (1.0, 0));
        assert_eq!(out, [0; 4]);
        let (s, zp) = quantize_row(&[-2.0; 4], None, &mut out);
        assert_eq!((s, zp), (2.0 / 255.0, 255));
        assert_eq!(out, [0; 4]);
    }
}
