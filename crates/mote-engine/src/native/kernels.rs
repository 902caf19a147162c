//! Numeric kernels of the native backends, with runtime CPU dispatch.
//!
//! Determinism by construction: every dot product uses one canonical accumulation order on
//! every ISA path — eight partial sums (lane `i` takes elements `k ≡ i mod 8`, fused
//! multiply-add), reduced as `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`, then the tail in
//! order. The scalar reference computes exactly that, so forced ISA levels give identical
//! bits. Work is split across threads by output element, never along the summed dimension.

use std::sync::OnceLock;

/// Instruction-set levels the kernels can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust, the reference.
    Scalar,
    /// AVX2 + FMA + F16C (every AVX2 CPU has the latter two).
    Avx2,
    /// The AVX2 level plus AVX-512 F, BW, DQ and VL (512-bit registers, 32 of them).
    Avx512,
    /// The AVX-512 level plus VNNI (`vpdpbusd`: u8 × s8 dot products of four into i32).
    Avx512Vnni,
}

/// Environment variable forcing an ISA level (`scalar`, `avx2`, `avx512`, `avx512vnni`);
/// for tests and benchmarks.
pub const MOTE_ISA: &str = "MOTE_ISA";

/// The best level this CPU supports (probed once; the kernels' level checks call this).
pub fn detect() -> Isa {
    static BEST: OnceLock<Isa> = OnceLock::new();
    *BEST.get_or_init(probe)
}

fn probe() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl");
            return match (avx512, is_x86_feature_detected!("avx512vnni")) {
                (true, true) => Isa::Avx512Vnni,
                (true, false) => Isa::Avx512,
                _ => Isa::Avx2,
            };
        }
    }
    Isa::Scalar
}

/// The level in use: `MOTE_ISA` if set (capped at what the CPU has), else the best available.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = detect();
        match std::env::var(MOTE_ISA).as_deref() {
            Ok("scalar") => Isa::Scalar,
            Ok("avx2") => best.min(Isa::Avx2),
            Ok("avx512") => best.min(Isa::Avx512),
            Ok("avx512vnni") => best.min(Isa::Avx512Vnni),
            _ => best,
        }
    })
}

/// Canonical-order dot product, scalar reference.
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] = a[c * 8 + l].mul_add(b[c * 8 + l], acc[l]);
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for k in chunks * 8..a.len() {
        sum = a[k].mul_add(b[k], sum);
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Reduce eight lanes in the canonical order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn reduce(v: __m256) -> f32 {
        // lanes: lo = l0..l3, hi = l4..l7; s = (l0+l4, l1+l5, l2+l6, l3+l7)
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        // t = (s0+s2, s1+s3, ..)
        let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
        // (s0+s2) + (s1+s3)
        _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps::<0b01>(t, t)))
    }

    /// A 3x4 tile: dot products of three rows of `x` with four rows of `w`, each in the
    /// canonical order (the same bits as [`super::dot_scalar`] of that pair).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; every slice must have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile3x4(x: [&[f32]; 3], w: [&[f32]; 4]) -> [[f32; 4]; 3] {
        let n = x[0].len();
        let chunks = n / 8;
        let (x0, x1, x2) = (x[0].as_ptr(), x[1].as_ptr(), x[2].as_ptr());
        let (w0, w1, w2, w3) = (w[0].as_ptr(), w[1].as_ptr(), w[2].as_ptr(), w[3].as_ptr());
        let z = _mm256_setzero_ps();
        let (mut a00, mut a01, mut a02, mut a03) = (z, z, z, z);
        let (mut a10, mut a11, mut a12, mut a13) = (z, z, z, z);
        let (mut a20, mut a21, mut a22, mut a23) = (z, z, z, z);
        for c in 0..chunks {
            let o = c * 8;
            // SAFETY: o + 8 <= n, and every slice has length n (caller's contract).
            unsafe {
                let v0 = _mm256_loadu_ps(x0.add(o));
                let v1 = _mm256_loadu_ps(x1.add(o));
                let v2 = _mm256_loadu_ps(x2.add(o));
                let u = _mm256_loadu_ps(w0.add(o));
                a00 = _mm256_fmadd_ps(v0, u, a00);
                a10 = _mm256_fmadd_ps(v1, u, a10);
                a20 = _mm256_fmadd_ps(v2, u, a20);
                let u = _mm256_loadu_ps(w1.add(o));
                a01 = _mm256_fmadd_ps(v0, u, a01);
                a11 = _mm256_fmadd_ps(v1, u, a11);
                a21 = _mm256_fmadd_ps(v2, u, a21);
                let u = _mm256_loadu_ps(w2.add(o));
                a02 = _mm256_fmadd_ps(v0, u, a02);
                a12 = _mm256_fmadd_ps(v1, u, a12);
                a22 = _mm256_fmadd_ps(v2, u, a22);
                let u = _mm256_loadu_ps(w3.add(o));
                a03 = _mm256_fmadd_ps(v0, u, a03);
                a13 = _mm256_fmadd_ps(v1, u, a13);
                a23 = _mm256_fmadd_ps(v2, u, a23);
            }
        }
        let acc = [
            [a00, a01, a02, a03],
            [a10, a11, a12, a13],
            [a20, a21, a22, a23],
        ];
        let mut out = [[0f32; 4]; 3];
        for r in 0..3 {
            for j in 0..4 {
                let mut sum = reduce(acc[r][j]);
                for k in chunks * 8..n {
                    sum = x[r][k].mul_add(w[j][k], sum);
                }
                out[r][j] = sum;
            }
        }
        out
    }

    /// `y[i] = fma(a, x[i], y[i])` for every `i`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `x` and `y` must have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let chunks = n / 8;
        let av = _mm256_set1_ps(a);
        for c in 0..chunks {
            let o = c * 8;
            // SAFETY: o + 8 <= n == y.len().
            unsafe {
                let r = _mm256_fmadd_ps(
                    av,
                    _mm256_loadu_ps(x.as_ptr().add(o)),
                    _mm256_loadu_ps(y.as_ptr().add(o)),
                );
                _mm256_storeu_ps(y.as_mut_ptr().add(o), r);
            }
        }
        for i in chunks * 8..n {
            y[i] = a.mul_add(x[i], y[i]);
        }
    }

    /// One canonical-order dot product.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `a` and `b` must have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let chunks = n / 8;
        let mut acc = _mm256_setzero_ps();
        for c in 0..chunks {
            // SAFETY: c * 8 + 8 <= n == b.len().
            unsafe {
                acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(c * 8)),
                    _mm256_loadu_ps(b.as_ptr().add(c * 8)),
                    acc,
                );
            }
        }
        let mut sum = reduce(acc);
        for k in chunks * 8..n {
            sum = a[k].mul_add(b[k], sum);
        }
        sum
    }
}

/// Canonical-order dot product on the selected ISA.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of unequal lengths");
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() returns Avx2 or above only when the CPU has AVX2 and FMA; lengths
        // checked above.
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni => unsafe { avx2::dot(a, b) },
        _ => dot_scalar(a, b),
    }
}

/// `y[i] = fma(a, x[i], y[i])`, scalar reference.
pub fn axpy_scalar(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = a.mul_add(*xi, *yi);
    }
}

/// `y[i] = fma(a, x[i], y[i])` on the selected ISA (each element's arithmetic is the same
/// on every path).
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy of unequal lengths");
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() returns Avx2 or above only when the CPU has AVX2 and FMA; lengths
        // checked above.
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni => unsafe { avx2::axpy(a, x, y) },
        _ => axpy_scalar(a, x, y),
    }
}

/// `out[r][j] = bias[j] + dot(x[r], w[j])` for `x: [rows, k]`, `w: [n, k]` (PyTorch's
/// `[out, in]` layout), `out: [rows, n]`. Splits rows across `pool` threads.
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    k: usize,
    out: &mut [f32],
    pool: &crate::threads::ThreadPool,
) {
    let n = bias.len();
    assert_eq!(w.len(), n * k, "weight shape");
    assert_eq!(x.len() % k, 0, "input shape");
    let rows = x.len() / k;
    assert_eq!(out.len(), rows * n, "output shape");
    // Blocks of COLS output columns, one task each: a block of W (COLS x k) stays in cache
    // while every row of x streams past it. Each output element is computed by one task in
    // the canonical order, whatever the blocking, thread count or ISA.
    const COLS: usize = 16;
    let blocks: Vec<usize> = (0..n.div_ceil(COLS)).collect();
    let results = pool.map(blocks, |b| {
        let j0 = b * COLS;
        let nc = COLS.min(n - j0);
        let mut block = vec![0f32; rows * nc];
        linear_block(x, w, k, j0, nc, rows, &mut block);
        block
    });
    for (b, block) in results.into_iter().enumerate() {
        let j0 = b * COLS;
        let nc = block.len() / rows.max(1);
        for r in 0..rows {
            for c in 0..nc {
                out[r * n + j0 + c] = block[r * nc + c] + bias[j0 + c];
            }
        }
    }
}

/// Columns `j0..j0 + nc` of `x · wᵀ` for all rows, into `block: [rows, nc]` (no bias).
fn linear_block(
    x: &[f32],
    w: &[f32],
    k: usize,
    j0: usize,
    nc: usize,
    rows: usize,
    block: &mut [f32],
) {
    let xrow = |r: usize| &x[r * k..(r + 1) * k];
    let wrow = |j: usize| &w[j * k..(j + 1) * k];
    let mut r = 0;
    #[cfg(target_arch = "x86_64")]
    if isa() >= Isa::Avx2 {
        while r + 3 <= rows {
            let mut c = 0;
            while c + 4 <= nc {
                let ws = [0, 1, 2, 3].map(|i| wrow(j0 + c + i));
                // SAFETY: Avx2 is selected only when the CPU has AVX2 and FMA; all slices are k long.
                let d = unsafe { avx2::tile3x4([xrow(r), xrow(r + 1), xrow(r + 2)], ws) };
                for (dr, row) in d.iter().enumerate() {
                    block[(r + dr) * nc + c..(r + dr) * nc + c + 4].copy_from_slice(row);
                }
                c += 4;
            }
            for cc in c..nc {
                for dr in 0..3 {
                    block[(r + dr) * nc + cc] = dot(xrow(r + dr), wrow(j0 + cc));
                }
            }
            r += 3;
        }
    }
    for rr in r..rows {
        for c in 0..nc {
            block[rr * nc + c] = dot(xrow(rr), wrow(j0 + c));
        }
    }
}

/// Softmax of one row, in place (max-subtracted, summed in order).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vecs() -> impl Strategy<Value = (Vec<f32>, Vec<Vec<f32>>)> {
        (1usize..80).prop_flat_map(|n| {
            (
                proptest::collection::vec(-4f32..4f32, n),
                proptest::collection::vec(proptest::collection::vec(-4f32..4f32, n), 4),
            )
        })
    }

    proptest! {
        #[test]
        fn simd_dot_is_bit_identical_to_the_scalar_reference((x, w) in vecs()) {
            for row in &w {
                prop_assert_eq!(dot(&x, row).to_bits(), dot_scalar(&x, row).to_bits());
            }
            #[cfg(target_arch = "x86_64")]
            if detect() >= Isa::Avx2 {
                // SAFETY: AVX2+FMA detected; the tile's rows all have x's length.
                let t = unsafe { avx2::tile3x4([&w[1], &x, &w[3]], [&w[0], &w[1], &w[2], &w[3]]) };
                for (r, xr) in [&w[1], &x, &w[3]].iter().enumerate() {
                    for i in 0..4 {
                        prop_assert_eq!(t[r][i].to_bits(), dot_scalar(xr, &w[i]).to_bits());
                    }
                }
            }
        }

        #[test]
        fn simd_axpy_is_bit_identical_to_the_scalar_reference((x, w) in vecs(), a in -3f32..3f32) {
            let mut y1 = w[0].clone();
            let mut y2 = w[0].clone();
            axpy(a, &x, &mut y1);
            axpy_scalar(a, &x, &mut y2);
            prop_assert_eq!(y1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), y2.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }

        #[test]
        fn linear_is_identical_across_thread_counts(
            rows in 1usize..9, k in 1usize..40, n in 1usize..11, seed in any::<u32>()
        ) {
            let mut s = seed as u64 | 1;
            let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5 };
            let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let mut one = vec![0f32; rows * n];
            let mut two = vec![0f32; rows * n];
            linear(&x, &w, &b, k, &mut one, &crate::threads::ThreadPool::new(1).unwrap());
            linear(&x, &w, &b, k, &mut two, &crate::threads::ThreadPool::new(2).unwrap());
            prop_assert_eq!(&one, &two);
            for r in 0..rows {
                for j in 0..n {
                    let want = dot_scalar(&x[r * k..(r + 1) * k], &w[j * k..(j + 1) * k]) + b[j];
                    prop_assert_eq!(one[r * n + j].to_bits(), want.to_bits());
                }
            }
        }
    }
}
