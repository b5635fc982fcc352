//! The MPI sample job: the same 2-D heat equation as `stencil` (Jacobi
//! sweeps on an N x N grid, hot top edge), with the grid's rows split across
//! MPI ranks that swap halo rows with their neighbours every iteration and
//! meet in a collective every few iterations. It exists so that ckpt has a
//! real MPI program to checkpoint: several processes, Open MPI's daemons and
//! its TCP or shared-memory connections between them, and messages in flight
//! at almost any instant. The final checksum is bit for bit the one
//! `stencil --size N --iters K` prints, whatever the number of ranks, so a
//! restored run can be checked against an uninterrupted one, against a run on
//! a different number of ranks, and against a run without MPI at all.

use std::io::Write;
use std::time::Instant;

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::topology::{Process, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;

const USAGE: &str = "usage: heat [--size N] [--iters K] [--every P]";

struct Args {
    size: usize,
    iters: usize,
    every: usize,
}

fn parse_args() -> Result<Args, String> {
    // Sized so that 4 ranks on 2 cores take 20 to 60 s (oversubscribed
    // ranks wait on each other, so the time swings with other load) and
    // print 10 progress lines: long enough to checkpoint mid-run, short
    // enough for a test.
    let mut a = Args {
        size: 512,
        iters: 120000,
        every: 12000,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let slot = match k.as_str() {
            "--size" => &mut a.size,
            "--iters" => &mut a.iters,
            "--every" => &mut a.every,
            _ => return Err(format!("unknown argument {k}")),
        };
        *slot = it
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{k} needs a non-negative integer"))?;
    }
    if a.every == 0 {
        return Err("--every must be at least 1".into());
    }
    Ok(a)
}

/// Which inner rows (1..n-1) each rank owns: the same formula `stencil`
/// uses for its threads, so ranks beyond the number of inner rows simply
/// own none.
struct Split {
    inner: usize,
    ranks: usize,
}

impl Split {
    fn first(&self, r: usize) -> usize {
        1 + self.inner * r / self.ranks
    }

    fn rows(&self, r: usize) -> usize {
        self.first(r + 1) - self.first(r)
    }

    /// Neighbours are the nearest ranks that own rows, not rank +/- 1:
    /// a rank with no rows must not sit in the halo chain.
    fn neighbours(&self, r: usize) -> (Option<usize>, Option<usize>) {
        let prev = (0..r).rev().find(|&q| self.rows(q) > 0);
        let next = (r + 1..self.ranks).find(|&q| self.rows(q) > 0);
        (prev, next)
    }
}

/// A checkpoint can come at any moment and the output is a file that tests
/// read during the run and after a restore: nothing may wait in a buffer
/// inside the process image.
fn say(line: std::fmt::Arguments) {
    let mut out = std::io::stdout().lock();
    // A closed stdout must not stop the computation.
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

/// Swaps halo rows with both neighbours. `local` holds the top halo row,
/// the `m` owned rows and the bottom halo row.
fn exchange(local: &mut [f64], n: usize, m: usize, prev: Option<Process>, next: Option<Process>) {
    let (top, rest) = local.split_at_mut(n);
    let (mine, bottom) = rest.split_at_mut(m * n);
    let (first, last) = (&mine[..n], &mine[(m - 1) * n..]);
    mpi::request::scope(|scope| {
        // Receives first, so that no send ever waits for a receive to be
        // posted, whatever the transport's eager limit.
        let mut reqs = Vec::with_capacity(4);
        if let Some(p) = prev {
            reqs.push(p.immediate_receive_into(scope, top));
        }
        if let Some(q) = next {
            reqs.push(q.immediate_receive_into(scope, bottom));
        }
        if let Some(p) = prev {
            reqs.push(p.immediate_send(scope, first));
        }
        if let Some(q) = next {
            reqs.push(q.immediate_send(scope, last));
        }
        for r in reqs {
            r.wait();
        }
    });
}

fn sweep(src: &[f64], dst: &mut [f64], n: usize, m: usize) {
    for i in 1..=m {
        let up = &src[(i - 1) * n..i * n];
        let row = &src[i * n..(i + 1) * n];
        let down = &src[(i + 1) * n..(i + 2) * n];
        let out = &mut dst[i * n..(i + 1) * n];
        for j in 1..n - 1 {
            // Exactly stencil's expression and order of additions: the
            // checksum compares the bits of every cell.
            out[j] = 0.25 * (up[j] + down[j] + row[j - 1] + row[j + 1]);
        }
    }
}

/// The largest change of any owned cell in the last sweep. Taken with max,
/// which is exact, so it does not depend on how the rows are split.
fn residual(src: &[f64], dst: &[f64], n: usize, m: usize) -> f64 {
    src[n..(m + 1) * n]
        .iter()
        .zip(&dst[n..(m + 1) * n])
        .fold(0.0, |acc, (a, b)| f64::max(acc, (b - a).abs()))
}

fn main() {
    let universe = mpi::initialize().expect("MPI initialised twice");
    let world = universe.world();
    let rank = world.rank() as usize;
    let ranks = world.size() as usize;
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if rank == 0 {
                eprintln!("{e}\n{USAGE}");
            }
            // Every rank saw the same arguments and leaves the same way;
            // finalizing first keeps it an orderly exit, not an MPI error.
            drop(universe);
            std::process::exit(2)
        }
    };
    let n = a.size.max(3);
    // MPI counts and displacements are C ints; the gather addresses cells.
    if n.checked_mul(n)
        .and_then(|c| Count::try_from(c).ok())
        .is_none()
    {
        if rank == 0 {
            eprintln!("--size {n} is too large: the grid must have fewer than 2^31 cells\n{USAGE}");
        }
        drop(universe);
        std::process::exit(2)
    }
    let split = Split {
        inner: n - 2,
        ranks,
    };
    let lo = split.first(rank);
    let m = split.rows(rank);
    let (prev, next) = split.neighbours(rank);
    let proc_at = |q: usize| world.process_at_rank(q as i32);
    let (prev, next) = (prev.map(proc_at), next.map(proc_at));

    // Local rows lo-1 ..= lo+m: the owned rows between two halo rows.
    let mut src = vec![0.0f64; (m + 2) * n];
    let mut dst = vec![0.0f64; (m + 2) * n];
    if lo == 1 {
        // This rank's top halo is the hot edge itself, never received.
        src[..n].fill(100.0);
        dst[..n].fill(100.0);
    }
    let centre_row = n / 2;
    let centre_at = (lo..lo + m)
        .contains(&centre_row)
        .then(|| (centre_row - lo + 1) * n + n / 2);

    world.barrier();
    let start = Instant::now();
    for it in 0..a.iters {
        if m > 0 {
            exchange(&mut src, n, m, prev, next);
            sweep(&src, &mut dst, n, m);
        }
        if (it + 1) % a.every == 0 {
            // Every rank joins, rows or not: a collective that ties all
            // ranks together now and then, not only neighbours.
            let local = [
                centre_at.map_or(f64::NEG_INFINITY, |c| dst[c]),
                if m > 0 {
                    residual(&src, &dst, n, m)
                } else {
                    f64::NEG_INFINITY
                },
            ];
            let mut global = [0.0f64; 2];
            world.all_reduce_into(&local[..], &mut global[..], SystemOperation::max());
            if rank == 0 {
                say(format_args!(
                    "iter {:>6}  centre {:.9}  residual {:.3e}  elapsed {:.2}s",
                    it + 1,
                    global[0],
                    global[1],
                    start.elapsed().as_secs_f64()
                ));
            }
        }
        std::mem::swap(&mut src, &mut dst);
    }

    gather_and_report(&world, &split, &src[n..(m + 1) * n], n, &a, start);
}

/// Assembles the whole field on rank 0 and prints the same checksum line as
/// `stencil`, computed over the whole grid in the same order.
fn gather_and_report(
    world: &SimpleCommunicator,
    split: &Split,
    mine: &[f64],
    n: usize,
    a: &Args,
    start: Instant,
) {
    let root = world.process_at_rank(0);
    if world.rank() != 0 {
        root.gather_varcount_into(mine);
        return;
    }
    let counts: Vec<Count> = (0..split.ranks)
        .map(|q| (split.rows(q) * n) as Count)
        .collect();
    let displs: Vec<Count> = (0..split.ranks)
        .map(|q| (split.first(q) * n) as Count)
        .collect();
    let mut field = vec![0.0f64; n * n];
    field[..n].fill(100.0);
    root.gather_varcount_into_root(mine, &mut PartitionMut::new(&mut field[..], counts, displs));
    let sum: f64 = field.iter().sum();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in &field {
        h = (h ^ v.to_bits()).wrapping_mul(0x0100_0000_01b3);
    }
    say(format_args!(
        "done {} iterations of {n}x{n} on {} ranks in {:.2}s",
        a.iters,
        split.ranks,
        start.elapsed().as_secs_f64()
    ));
    say(format_args!("checksum {h:016x} sum {sum:.6}"));
}
