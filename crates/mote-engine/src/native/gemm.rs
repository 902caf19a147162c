//! Dense f32 matrix products against constant weights, packed once at load time.
//!
//! `y = x · Wᵀ + b` for `x: [rows, k]` and `W: [n, k]` (PyTorch's `[out, in]` layout). The
//! weights are repacked into panels of 16 output columns, `k` steps of 16 contiguous floats
//! each, so the micro-kernel streams them in order; each tile (AVX-512: 12 rows × 16, one
//! register per row; AVX2: 6 rows × 16, two per row) keeps its sums in registers and
//! broadcasts one input value per row and step. On the last k slice the AVX-512 tile adds
//! the bias, applies the activation ([`Act`]) and writes its rows itself, having asked for
//! their cache lines when it started (large products' outputs are not in cache).
//!
//! Canonical order (what makes results bit-reproducible): every output element is
//! `fma(x[r][k-1], w[j][k-1], … fma(x[r][0], w[j][0], 0.0)) + b[j]`, one fused multiply-add
//! per step in increasing `k`. The scalar path computes exactly that; the SIMD paths compute
//! it for 8 or 16 columns per vector. Tiles, row blocks and threads only decide *which*
//! elements a task computes, never how, so results do not depend on the thread count, on the
//! other rows of the batch, or on the ISA level.

use super::kernels::{Isa, detect, isa};
use super::vector::gelu_at;
use crate::threads::ThreadPool;

/// Output columns per panel.
const NR: usize = 16;
/// Rows per micro-kernel tile (the AVX2 kernel takes them six at a time: 12 of its 16
/// registers hold sums; AVX-512 has 32 registers of 16 floats, one per row).
const MR: usize = 12;
/// Most rows per parallel task: one block for a sequence of up to 132 tokens, so each weight
/// panel is streamed from memory by one thread only (with two row blocks both threads read
/// every panel; MiniLM fp32 b1 s128 paired A/B: ~0.92× the time of 96 rows). Larger
/// products are not sensitive to it.
const MC: usize = 132;
/// Panels per parallel task.
const PANELS: usize = 4;
/// Steps of `k` per pass over a block's rows (a 384 × 16 slice of a panel is 24 KiB).
const KC: usize = 384;

/// Weights `[n, k]` packed into 16-column panels, with their bias.
pub struct Packed {
    /// `n.div_ceil(16)` panels of `k × 16` floats (columns past `n` are zero).
    data: Vec<f32>,
    bias: Vec<f32>,
    n: usize,
    k: usize,
}

impl Packed {
    /// Pack `w: [n, k]` (row-major) and `bias: [n]`.
    pub fn new(w: &[f32], bias: &[f32], k: usize) -> Packed {
        let n = bias.len();
        assert_eq!(w.len(), n * k, "weight shape");
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        for j in 0..n {
            let (p, c) = (j / NR, j % NR);
            for kk in 0..k {
                data[(p * k + kk) * NR + c] = w[j * k + kk];
            }
        }
        Packed {
            data,
            bias: bias.to_vec(),
            n,
            k,
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
        self.matmul_at(isa(), x, out, pool, Act::Identity);
    }

    /// `out = act(x · Wᵀ + b)`: [`Packed::matmul`] with the activation applied as each tile
    /// is written (the same bits as applying it afterwards, without a second pass over
    /// `out`).
    pub fn matmul_act(&self, x: &[f32], out: &mut [f32], pool: &ThreadPool, act: Act) {
        self.matmul_at(isa(), x, out, pool, act);
    }

    /// [`Packed::matmul_act`] on the given ISA level (at most what the CPU has): the same
    /// bits on every level.
    fn matmul_at(&self, level: Isa, x: &[f32], out: &mut [f32], pool: &ThreadPool, act: Act) {
        assert!(level <= detect(), "{level:?} is beyond this CPU");
        let (n, k) = (self.n, self.k);
        assert!(k > 0 && x.len().is_multiple_of(k), "input shape");
        let rows = x.len() / k;
        assert_eq!(out.len(), rows * n, "output shape");
        if rows == 0 || n == 0 {
            return;
        }
        let panels = n.div_ceil(NR);
        let dst = OutPtr(out.as_mut_ptr());
        for_each_block(pool, rows, panels, (MR, MC, PANELS), |r0, nr, group| {
            let xs = &x[r0 * k..(r0 + nr) * k];
            // The running sums of one panel for the block's rows: the k steps are taken in
            // slices of KC (so the slice of the panel stays in L1 across the row tiles), each
            // tile continuing the fused multiply-add chain from the stored sums — the same
            // chain, hence the same bits, as one pass over k.
            let mut sums = vec![[0f32; NR]; nr];
            for p in group {
                let w = &self.data[p * k * NR..][..k * NR];
                // The next panel, which the first tile of each slice pulls towards L2 while it
                // computes: with few rows (one sequence) each panel is used by a handful of
                // tiles only, and its first tile would otherwise wait on memory.
                let next = self.data.get((p + 1) * k * NR..(p + 2) * k * NR);
                let j0 = p * NR;
                let cols = NR.min(n - j0);
                let mut written = false;
                for k0 in (0..k).step_by(KC) {
                    let kc = KC.min(k - k0);
                    let mut r = 0;
                    while r < nr {
                        let m = MR.min(nr - r);
                        let ahead = next.filter(|_| r == 0).map(|n| &n[k0 * NR..]);
                        let sums = &mut sums[r..r + m];
                        let slice = (k0, kc, &w[k0 * NR..]);
                        // The last slice may add the bias and write the rows itself.
                        let finish = (k0 + kc == k).then(|| Finish {
                            out: dst.at((r0 + r) * n + j0),
                            n,
                            cols,
                            bias: &self.bias[j0..j0 + cols],
                            act,
                        });
                        written = tile_kernel(level, xs, r, k, slice, ahead, m, sums, finish);
                        r += m;
                    }
                }
                if written {
                    continue;
                }
                for (i, s) in sums.iter().enumerate() {
                    // SAFETY: row r0 + i < rows and columns j0..j0 + cols <= n: inside `out`,
                    // and this task owns the (row, panel) pair.
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(dst.at((r0 + i) * n + j0), cols) };
                    for ((d, s), b) in row.iter_mut().zip(s).zip(&self.bias[j0..]) {
                        *d = s + b;
                    }
                    if act == Act::Gelu {
                        gelu_at(level, row);
                    }
                }
            }
        });
    }
}

/// Call `task(r0, rows_in_block, panel_range)` for every (row block × panel group) of a
/// product of `rows` rows and `panels` output panels, in parallel on `pool`. Row blocks are
/// balanced, a multiple of `mr` (the tile height) and about `mc` rows at most; groups hold
/// `per_group` panels. Every (row, panel) pair belongs to exactly one task.
pub(crate) fn for_each_block(
    pool: &ThreadPool,
    rows: usize,
    panels: usize,
    (mr, mc, per_group): (usize, usize, usize),
    task: impl Fn(usize, usize, std::ops::Range<usize>) + Sync + Send,
) {
    let blocks = rows.div_ceil(mc);
    let block_rows = rows.div_ceil(blocks).next_multiple_of(mr);
    let groups = panels.div_ceil(per_group);
    let tasks = rows.div_ceil(block_rows) * groups;
    pool.for_each_index(tasks, |t| {
        let (rb, pg) = (t / groups, t % groups);
        let r0 = rb * block_rows;
        let nr = block_rows.min(rows - r0);
        task(r0, nr, pg * per_group..((pg + 1) * per_group).min(panels));
    });
}

/// Ask for the cache lines of `rows` output rows (`n` floats apart, `cols` ≥ 1 columns each,
/// from `out`) ahead of writing them: a hint, which never faults and which no result depends
/// on. Large products' outputs are not in cache, and each write would otherwise wait on its
/// line (both ends of a row: 16 floats span two lines unless 64-byte aligned).
#[inline]
pub(crate) fn prefetch_out(out: *const f32, n: usize, rows: usize, cols: usize) {
    #[cfg(target_arch = "x86_64")]
    for i in 0..rows {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let row = out.wrapping_add(i * n);
        // SAFETY: SSE is part of every x86_64 CPU, and a prefetch never faults, whatever
        // the address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(row as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(cols - 1) as *const i8);
        }
    }
}

/// The output pointer shared by the tasks of one product (each writes its own elements).
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint elements (each owns its (row, panel) pairs, see
// `for_each_block`), and the pointer is used only while the `&mut` it came from is borrowed.
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// The element at offset `i` (callers pass offsets inside the output slice).
    pub(crate) fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// An activation applied to a product's outputs as they are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// None: `x · Wᵀ + b`.
    Identity,
    /// GELU (erf form), [`super::vector::gelu`]'s operations.
    Gelu,
}

/// Where a tile of the last k slice may write its rows: `act(sums + bias)` for `cols`
/// columns, row `i` at `out + i·n` (the epilogue of [`Packed::matmul_act`], same operations).
struct Finish<'a> {
    out: *mut f32,
    n: usize,
    cols: usize,
    bias: &'a [f32],
    act: Act,
}

/// One tile: rows `r..r + m` (m ≤ 12) of `x` (rows of `k`), steps `k0..k0 + kc`, against
/// the panel slice `w` (`kc × 16`), continuing the chains in `sums` (zero when `k0 == 0`),
/// on ISA `level` (at most the CPU's). `ahead`, when given, is the same slice of another
/// panel to prefetch (no effect on results). With `finish` (the last slice), the AVX-512
/// path writes the tile's outputs itself and returns true; otherwise the sums are left in
/// `sums` and it returns false.
///
/// `finish.out` must point at `m` rows of `finish.n` writable floats with `cols` columns
/// each, owned by the caller's task.
#[allow(clippy::too_many_arguments)]
fn tile_kernel(
    level: Isa,
    x: &[f32],
    r: usize,
    k: usize,
    (k0, kc, w): (usize, usize, &[f32]),
    ahead: Option<&[f32]>,
    m: usize,
    sums: &mut [[f32; NR]],
    finish: Option<Finish>,
) -> bool {
    assert!(m <= MR && sums.len() == m && x.len() >= (r + m) * k && k0 + kc <= k);
    assert!(w.len() >= kc * NR);
    let fresh = k0 == 0;
    #[cfg(target_arch = "x86_64")]
    if level >= Isa::Avx512 {
        let xs = &x[r * k + k0..];
        let a = ahead.filter(|a| a.len() >= kc * NR);
        let written = finish.is_some();
        let f = finish.as_ref();
        // SAFETY: the level is at most the CPU's (the caller asserts it), so it has AVX-512 F
        // and DQ; the bounds the kernel reads are asserted above (m rows of stride k from xs,
        // kc × 16 of w, and of `ahead` when given); `finish`'s rows are the caller's to write
        // (contract above).
        unsafe {
            use avx512::tile;
            match (m, a) {
                (12, Some(a)) => tile::<12, true>(xs, k, kc, w, a, fresh, sums, f),
                (12, None) => tile::<12, false>(xs, k, kc, w, w, fresh, sums, f),
                (11, _) => tile::<11, false>(xs, k, kc, w, w, fresh, sums, f),
                (10, _) => tile::<10, false>(xs, k, kc, w, w, fresh, sums, f),
                (9, _) => tile::<9, false>(xs, k, kc, w, w, fresh, sums, f),
                (8, _) => tile::<8, false>(xs, k, kc, w, w, fresh, sums, f),
                (7, _) => tile::<7, false>(xs, k, kc, w, w, fresh, sums, f),
                (6, _) => tile::<6, false>(xs, k, kc, w, w, fresh, sums, f),
                (5, _) => tile::<5, false>(xs, k, kc, w, w, fresh, sums, f),
                (4, _) => tile::<4, false>(xs, k, kc, w, w, fresh, sums, f),
                (3, _) => tile::<3, false>(xs, k, kc, w, w, fresh, sums, f),
                (2, _) => tile::<2, false>(xs, k, kc, w, w, fresh, sums, f),
                _ => tile::<1, false>(xs, k, kc, w, w, fresh, sums, f),
            }
        }
        return written;
    }
    #[cfg(target_arch = "x86_64")]
    if level >= Isa::Avx2 {
        for (i, sums) in sums.chunks_mut(6).enumerate() {
            let xs = &x[(r + 6 * i) * k + k0..];
            // Only the first six rows prefetch (once per slice is enough).
            let a = ahead.filter(|a| i == 0 && a.len() >= kc * NR);
            // SAFETY: the level is at most the CPU's (the caller asserts it), so it has AVX2
            // and FMA; this chunk's rows (at most 6, of stride k from xs) are inside the
            // asserted m rows, and the slices' bounds are asserted above.
            unsafe {
                use avx2::tile;
                match (sums.len(), a) {
                    (6, Some(a)) => tile::<6, true>(xs, k, kc, w, a, fresh, sums),
                    (6, None) => tile::<6, false>(xs, k, kc, w, w, fresh, sums),
                    (5, _) => tile::<5, false>(xs, k, kc, w, w, fresh, sums),
                    (4, _) => tile::<4, false>(xs, k, kc, w, w, fresh, sums),
                    (3, _) => tile::<3, false>(xs, k, kc, w, w, fresh, sums),
                    (2, _) => tile::<2, false>(xs, k, kc, w, w, fresh, sums),
                    _ => tile::<1, false>(xs, k, kc, w, w, fresh, sums),
                }
            }
        }
        return false;
    }
    for (i, s) in sums.iter_mut().enumerate() {
        for (c, out) in s.iter_mut().enumerate() {
            let mut acc = if fresh { 0f32 } else { *out };
            for kk in 0..kc {
                acc = x[(r + i) * k + k0 + kk].mul_add(w[kk * NR + c], acc);
            }
            *out = acc;
        }
    }
    false
}

/// The canonical product of one row and one weight row (the reference for tests).
pub fn dot_sequential(x: &[f32], w: &[f32]) -> f32 {
    x.iter().zip(w).fold(0f32, |acc, (a, b)| a.mul_add(*b, acc))
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::vector::avx512::gelu16;
    use super::{Act, Finish, MR, NR};

    /// `R` rows × 16 columns, one 512-bit register of sums per row, continuing from `sums`
    /// unless `fresh`: per step one load of the panel's 16 weights and one broadcast
    /// fused multiply-add per row — each element's chain is the scalar one. With
    /// `PREFETCH`, each step also asks for the matching line of `ahead` (towards L2).
    ///
    /// With `finish`, the sums plus bias go to its rows instead of `sums`.
    ///
    /// # Safety
    /// AVX-512F and DQ must be available; `x.len() >= (R - 1) * k + kc`, `w.len() >= kc * 16`,
    /// `ahead.len() >= kc * 16` with `PREFETCH`, `sums.len() == R`; `finish`, if given,
    /// points at `R` writable rows of `cols ≤ 16` floats, `n` apart.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn tile<const R: usize, const PREFETCH: bool>(
        x: &[f32],
        k: usize,
        kc: usize,
        w: &[f32],
        ahead: &[f32],
        fresh: bool,
        sums: &mut [[f32; NR]],
        finish: Option<&Finish>,
    ) {
        assert!(R <= MR && sums.len() == R && x.len() >= (R - 1) * k + kc && w.len() >= kc * NR);
        assert!(!PREFETCH || ahead.len() >= kc * NR);
        let mut acc = [_mm512_setzero_ps(); R];
        if !fresh {
            for (a, s) in acc.iter_mut().zip(sums.iter()) {
                // SAFETY: each `s` holds 16 floats.
                *a = unsafe { _mm512_loadu_ps(s.as_ptr()) };
            }
        }
        let (xp, wp, ap) = (x.as_ptr(), w.as_ptr(), ahead.as_ptr());
        if let Some(f) = finish {
            // The output lines are fetched while the tile computes.
            super::prefetch_out(f.out, f.n, R, f.cols);
        }
        for kk in 0..kc {
            if PREFETCH {
                _mm_prefetch::<_MM_HINT_T1>(ap.wrapping_add(kk * NR) as *const i8);
            }
            // SAFETY: kk * 16 + 16 <= kc * 16 <= w.len(); r * k + kk < (R-1) * k + kc <= x.len().
            unsafe {
                let wv = _mm512_loadu_ps(wp.add(kk * NR));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*xp.add(r * k + kk)), wv, *a);
                }
            }
        }
        if let Some(f) = finish {
            assert!(f.cols <= NR && f.bias.len() == f.cols);
            let mask: __mmask16 = ((1u32 << f.cols) - 1) as u16;
            // SAFETY: the masked load reads the bias's `cols` floats only.
            let bias = unsafe { _mm512_maskz_loadu_ps(mask, f.bias.as_ptr()) };
            for (i, a) in acc.iter().enumerate() {
                let y = _mm512_add_ps(*a, bias);
                let y = if f.act == Act::Gelu { gelu16(y) } else { y };
                // SAFETY: row i of the R rows `finish` points at, its `cols` columns.
                unsafe { _mm512_mask_storeu_ps(f.out.add(i * f.n), mask, y) };
            }
            return;
        }
        for (a, s) in acc.iter().zip(sums.iter_mut()) {
            // SAFETY: each `s` holds 16 floats.
            unsafe { _mm512_storeu_ps(s.as_mut_ptr(), *a) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::NR;

    /// `R` (≤ 6) rows × 16 columns, accumulators in registers, continuing from `sums` unless
    /// `fresh`. With `PREFETCH`, each step also asks for the matching line of `ahead`
    /// (towards L2), which the results never depend on.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `x.len() >= (R - 1) * k + kc`, `w.len() >= kc * 16`,
    /// `ahead.len() >= kc * 16` with `PREFETCH`, `sums.len() == R`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const R: usize, const PREFETCH: bool>(
        x: &[f32],
        k: usize,
        kc: usize,
        w: &[f32],
        ahead: &[f32],
        fresh: bool,
        sums: &mut [[f32; NR]],
    ) {
        assert!(R <= 6 && sums.len() == R && x.len() >= (R - 1) * k + kc && w.len() >= kc * NR);
        assert!(!PREFETCH || ahead.len() >= kc * NR);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        if !fresh {
            for (a, s) in acc.iter_mut().zip(sums.iter()) {
                // SAFETY: each `s` holds 16 floats.
                unsafe {
                    a[0] = _mm256_loadu_ps(s.as_ptr());
                    a[1] = _mm256_loadu_ps(s.as_ptr().add(8));
                }
            }
        }
        let (xp, wp, ap) = (x.as_ptr(), w.as_ptr(), ahead.as_ptr());
        for kk in 0..kc {
            if PREFETCH {
                // One 64-byte line of the other panel per step: its whole slice by the end.
                _mm_prefetch::<_MM_HINT_T1>(ap.wrapping_add(kk * NR) as *const i8);
            }
            // SAFETY: kk * 16 + 16 <= kc * 16 <= w.len(); r * k + kk < (R-1) * k + kc <= x.len().
            unsafe {
                let w0 = _mm256_loadu_ps(wp.add(kk * NR));
                let w1 = _mm256_loadu_ps(wp.add(kk * NR + 8));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*xp.add(r * k + kk));
                    a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
                }
            }
        }
        for (a, s) in acc.iter().zip(sums.iter_mut()) {
            // SAFETY: each `s` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(s.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(s.as_mut_ptr().add(8), a[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::vector::gelu_scalar;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn packed_matmul_is_the_canonical_product_on_every_path_and_thread_count(
            rows in prop_oneof![1usize..40, 120usize..300], k in prop_oneof![1usize..50, 380usize..800], n in 1usize..40,
            seed in any::<u64>()
        ) {
            let mut s = seed | 1;
            let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5 };
            let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let p = Packed::new(&w, &b, k);
            let mut one = vec![0f32; rows * n];
            let mut two = vec![0f32; rows * n];
            p.matmul(&x, &mut one, &ThreadPool::new(1).unwrap());
            p.matmul(&x, &mut two, &ThreadPool::new(2).unwrap());
            prop_assert_eq!(&one, &two);
            // Every level this CPU has gives the same bits (checked against the canonical
            // chain below).
            for level in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
                if level <= detect() {
                    let mut got = vec![0f32; rows * n];
                    p.matmul_at(level, &x, &mut got, &ThreadPool::new(2).unwrap(), Act::Identity);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    prop_assert_eq!(bits(&got), bits(&one), "{:?}", level);
                    // The fused activation gives the bits of the separate pass (scalar GELU).
                    p.matmul_at(level, &x, &mut got, &ThreadPool::new(2).unwrap(), Act::Gelu);
                    let want: Vec<f32> = one.iter().map(|&v| gelu_scalar(v)).collect();
                    prop_assert_eq!(bits(&got), bits(&want), "GELU on {:?}", level);
                }
            }
            for r in 0..rows {
                for j in 0..n {
                    let want = dot_sequential(&x[r * k..(r + 1) * k], &w[j * k..(j + 1) * k]) + b[j];
                    prop_assert_eq!(one[r * n + j].to_bits(), want.to_bits(), "row {} col {}", r, j);
                }
            }
            // A row alone gives the bits it gives in the batch.
            let mut alone = vec![0f32; n];
            let last = rows - 1;
            p.matmul(&x[last * k..], &mut alone, &ThreadPool::new(1).unwrap());
            prop_assert_eq!(&alone[..], &one[last * n..]);
        }
    }
}
