//! Matrix-product kernels alone on MiniLM's shapes (128 tokens): best-of-N time and GFLOP/s
//! for the f32 and int8 packed products, 1 and 2 threads. Best-of, because the machine is
//! shared and noisy; compare configurations within one run.
//! `GEMM_COLD=1` cycles the f32 product through weight copies larger than the last-level
//! cache, as a model's layers stream theirs (1 thread, 128 rows: ~3% below warm weights).

use std::time::Instant;

use mote_engine::ThreadPool;
use mote_engine::native::gemm::Packed;
use mote_engine::native::int8::{PackedI8, quantize_weights};

fn main() {
    let rows: usize = std::env::args()
        .nth(1)
        .map_or(128, |s| s.parse().expect("rows"));
    let shapes = [(384, 1152), (384, 384), (384, 1536), (1536, 384)];
    let mut s = 1u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    for threads in [1, 2] {
        let pool = ThreadPool::new(threads).unwrap();
        let (mut f32_t, mut i8_t, mut flops) = (0f64, 0f64, 0f64);
        for &(k, n) in &shapes {
            let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            // With GEMM_COLD=1 the f32 product cycles through copies of its weights that
            // together exceed the last-level cache (64 MB), as a model's layers do.
            let copies = if std::env::var_os("GEMM_COLD").is_some() {
                (64 << 20) / (n * k * 4) + 1
            } else {
                1
            };
            let ps: Vec<Packed> = (0..copies).map(|_| Packed::new(&w, &b, k)).collect();
            let mut turn = 0;
            let (q, sc) = quantize_weights(&w, k, None);
            let p8 = PackedI8::new(&q, &sc, &b, k, None, (&[], &[]));
            let ch = [3usize, 77, 100, 200];
            let ow: Vec<f32> = (0..n * 4).map(|i| i as f32 * 1e-4).collect();
            let p8o = PackedI8::new(&q, &sc, &b, k, None, (&ch, &ow));
            let mut out = vec![0f32; rows * n];
            let best = |f: &mut dyn FnMut()| {
                let mut best = f64::INFINITY;
                for _ in 0..60 {
                    let t = Instant::now();
                    f();
                    best = best.min(t.elapsed().as_secs_f64());
                }
                best
            };
            let tf = best(&mut || {
                turn = (turn + 1) % copies;
                ps[turn].matmul(&x, &mut out, &pool)
            });
            let ti = best(&mut || p8.matmul(&x, &mut out, &pool));
            let to = best(&mut || p8o.matmul(&x, &mut out, &pool));
            println!(
                "  int8 with 4 outlier channels: {:.3} ms ({:+.1}%)",
                to * 1e3,
                (to / ti - 1.0) * 100.0
            );
            let fl = 2.0 * (rows * k * n) as f64;
            println!(
                "threads {threads} {rows}x{k}->{n}: f32 {:.3} ms ({:.1} GFLOP/s), int8 {:.3} ms ({:.1} GOP/s)",
                tf * 1e3,
                fl / tf / 1e9,
                ti * 1e3,
                fl / ti / 1e9
            );
            f32_t += tf;
            i8_t += ti;
            flops += fl;
        }
        println!(
            "threads {threads} all four: f32 {:.3} ms ({:.1} GFLOP/s), int8 {:.3} ms ({:.1} GOP/s)",
            f32_t * 1e3,
            flops / f32_t / 1e9,
            i8_t * 1e3,
            flops / i8_t / 1e9
        );
    }
}
