//! A job with much memory and a small working set, like a solver holding
//! large read-mostly tables: it fills `--mib` MiB with a pattern, then
//! keeps rewriting its first `--hot-mib` MiB for `--seconds` seconds,
//! printing a progress line a second; at the end it checks every byte of
//! the rest against the pattern and prints `ok` or what differs. The
//! migration benchmark moves it while it runs.

use std::time::{Duration, Instant};

fn arg(name: &str, default: u64) -> u64 {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .map(|i| {
            argv.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| {
                    eprintln!(
                        "usage: hot-cold [--mib N] [--hot-mib H] [--seconds S]: {name} needs a number"
                    );
                    std::process::exit(2)
                })
        })
        .unwrap_or(default)
}

/// The cold pattern: a function of the word's index, so that a page from
/// elsewhere, or zeros, shows.
fn cold(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xc01d
}

fn main() {
    let mib = arg("--mib", 1024) as usize;
    let hot = (arg("--hot-mib", 16) as usize).min(mib);
    let seconds = arg("--seconds", 60);
    let words = mib << 17;
    let hot_words = hot << 17;
    let mut mem: Vec<u64> = (0..words).map(cold).collect();
    println!("ready: {mib} MiB, {hot} MiB hot");
    let t0 = Instant::now();
    let mut round = 0u64;
    let mut last = 0;
    while t0.elapsed() < Duration::from_secs(seconds) {
        round += 1;
        for w in mem[..hot_words].iter_mut() {
            *w = w.wrapping_add(round);
        }
        std::thread::sleep(Duration::from_millis(20));
        let s = t0.elapsed().as_secs();
        if s != last {
            last = s;
            println!("progress: {s} s, round {round}");
        }
    }
    let bad = (hot_words..words).find(|&i| mem[i] != cold(i));
    match bad {
        None => println!("ok: {} MiB intact after {round} rounds", mib - hot),
        Some(i) => {
            println!("BAD: word {i} is {:#x}, expected {:#x}", mem[i], cold(i));
            std::process::exit(1)
        }
    }
}
