//! A deterministic multi-threaded 2-D heat equation solver (Jacobi sweeps
//! on an N x N grid, hot top edge), the demo's sample job. It prints its
//! progress and, at the end, a checksum of the final field that does not
//! depend on timing or thread count, so a checkpointed run can be checked
//! against an uninterrupted one.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Barrier;
use std::time::Instant;

struct Args {
    size: usize,
    iters: usize,
    threads: usize,
    every: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        size: 256,
        iters: 20000,
        threads: 2,
        every: 2000,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let v = it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            eprintln!("usage: stencil [--size N] [--iters K] [--threads T] [--every P]");
            std::process::exit(2)
        });
        match k.as_str() {
            "--size" => a.size = v,
            "--iters" => a.iters = v,
            "--threads" => a.threads = v,
            "--every" => a.every = v,
            _ => {
                eprintln!("unknown argument {k}");
                std::process::exit(2)
            }
        }
    }
    a.threads = a.threads.clamp(1, a.size.max(3) - 2);
    a
}

fn main() {
    let a = parse_args();
    let n = a.size.max(3);
    // f64 values stored as bits in relaxed atomics: plain loads and stores,
    // shared safely between threads that write disjoint rows.
    let grids: [Vec<AtomicU64>; 2] = [
        (0..n * n).map(|_| AtomicU64::new(0)).collect(),
        (0..n * n).map(|_| AtomicU64::new(0)).collect(),
    ];
    for g in &grids {
        for cell in &g[..n] {
            cell.store(100f64.to_bits(), Relaxed);
        }
    }
    let barrier = Barrier::new(a.threads);
    let start = Instant::now();
    let inner = n - 2;
    std::thread::scope(|s| {
        for t in 0..a.threads {
            let (grids, barrier, a) = (&grids, &barrier, &a);
            let r0 = 1 + inner * t / a.threads;
            let r1 = 1 + inner * (t + 1) / a.threads;
            std::thread::Builder::new()
                .name(format!("stencil-{t}"))
                .spawn_scoped(s, move || {
                    for it in 0..a.iters {
                        let (src, dst) = (&grids[it % 2], &grids[(it + 1) % 2]);
                        let get = |i: usize, j: usize| f64::from_bits(src[i * n + j].load(Relaxed));
                        for i in r0..r1 {
                            for j in 1..n - 1 {
                                let v = 0.25
                                    * (get(i - 1, j)
                                        + get(i + 1, j)
                                        + get(i, j - 1)
                                        + get(i, j + 1));
                                dst[i * n + j].store(v.to_bits(), Relaxed);
                            }
                        }
                        barrier.wait();
                        if t == 0 && (it + 1) % a.every == 0 {
                            let centre = f64::from_bits(dst[(n / 2) * n + n / 2].load(Relaxed));
                            println!(
                                "iter {:>6}  centre {:.9}  elapsed {:.2}s",
                                it + 1,
                                centre,
                                start.elapsed().as_secs_f64()
                            );
                        }
                    }
                })
                .expect("spawn worker thread");
        }
    });
    let fin = &grids[a.iters % 2];
    let sum: f64 = fin.iter().map(|v| f64::from_bits(v.load(Relaxed))).sum();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in fin {
        h = (h ^ v.load(Relaxed)).wrapping_mul(0x0100_0000_01b3);
    }
    println!(
        "done {} iterations of {n}x{n} in {:.2}s",
        a.iters,
        start.elapsed().as_secs_f64()
    );
    println!("checksum {h:016x} sum {sum:.6}");
}
