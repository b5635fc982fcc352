//! How long a job stands still when `ckpt-coord migrate` moves it, live
//! (streamed from agent to agent with pre-copy) against through the store
//! (checkpoint --stop, then restart), on a 2-node lab of this machine.
//!
//! ```text
//! cargo bench -p ckpt-tests --bench migrate                    # 1 and 4 GiB
//! cargo bench -p ckpt-tests --bench migrate -- --sizes 1 --reps 3 --hot-mib 64
//! ```
//!
//! The job (`hot-cold`, jobs/) holds SIZE GiB and keeps rewriting its first
//! `--hot-mib` MiB (default 64) every 20 ms: a solver with large read-mostly
//! tables. Each rep moves it node 1 -> node 2 streamed, then back through
//! the store (and the next rep the other way round); `--lazy` restores the
//! streamed moves lazily (`migrate --lazy`). The figure is the
//! coordinator's `frozen_ms`: from the freeze of the part to its release
//! on the other node (through the store: the whole move, which stops the
//! job at its start and releases it at its end). Memory is prewarmed (1.25x
//! the size touched and freed) before each move; `--json` prints one JSON
//! line on stdout. Root only. `CKPT_LOG=debug CKPT_BENCH_KEEP_LOGS=DIR`
//! keeps the agents' logs, with the phases of every dump and restore.

use std::time::{Duration, Instant};

use ckpt_tests::{json_of, wait_for, CoordCluster};

struct Args {
    sizes: Vec<f64>,
    reps: usize,
    hot_mib: u64,
    json: bool,
    lazy: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        sizes: vec![1.0, 4.0],
        reps: 3,
        hot_mib: 64,
        json: false,
        lazy: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |what: &str| it.next().unwrap_or_else(|| panic!("{arg} needs {what}"));
        match arg.as_str() {
            "--sizes" => {
                a.sizes = value("GiB, e.g. 1,4")
                    .split(',')
                    .map(|s| s.parse().expect("--sizes: numbers of GiB"))
                    .collect()
            }
            "--reps" => a.reps = value("a count").parse().expect("--reps: a number"),
            "--hot-mib" => a.hot_mib = value("MiB").parse().expect("--hot-mib: a number"),
            "--json" => a.json = true,
            "--lazy" => a.lazy = true,
            _ => {} // cargo bench's own flags
        }
    }
    a
}

/// Touches and frees 1.25x `bytes`: this VM hands freed memory back to its
/// host, and first touches of memory it has to get back are slow.
fn prewarm(bytes: usize) {
    let len = bytes + bytes / 4;
    let mut v: Vec<u8> = Vec::with_capacity(len);
    v.resize(len, 1);
    std::hint::black_box(&v);
}

fn main() {
    let args = parse_args();
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("the migrate bench builds a lab: run it as root");
        std::process::exit(1);
    }
    let cl = CoordCluster::up("bench-migrate", 2);
    let bin = cl.shared_bin(&["hot-cold"]).join("hot-cold");
    let names = [
        cl.lab.node(1).name().to_string(),
        cl.lab.node(2).name().to_string(),
    ];
    let mut rows = Vec::new();
    for &gib in &args.sizes {
        let mib = (gib * 1024.0) as u64;
        let job = format!("benchmig{}-{mib}", std::process::id());
        // Its cgroup goes whatever happens (a failed move included).
        let _cgroup = ckpt_tests::JobCgroupGuard(format!("{job}.p"));
        let spec = cl.dir.join(&format!("{job}.toml"));
        std::fs::write(
            &spec,
            format!(
                "job = \"{job}\"\n[[part]]\nname = \"p\"\nnode = \"{}\"\ncommand = \"{}\"\n\
                 args = [\"--mib\", \"{mib}\", \"--hot-mib\", \"{}\", \"--seconds\", \"3600\"]\n",
                names[0],
                bin.display(),
                args.hot_mib
            ),
        )
        .unwrap();
        let o = cl.coord(2, &["launch", spec.to_str().unwrap()]);
        assert!(o.status.success(), "launch failed");
        let out = cl.store().join(&job).join("output/p.log");
        assert!(
            wait_for(Duration::from_secs(120), || std::fs::read_to_string(&out)
                .is_ok_and(|t| t.contains("progress:"))),
            "the job did not start"
        );
        for rep in 0..args.reps {
            // Each rep brings the job back where it started.
            let (there, back) = (&names[1], &names[0]);
            prewarm((mib as usize) << 20);
            let t = Instant::now();
            let mut argv = vec!["--json", "migrate", &job, "--to", there];
            if args.lazy {
                argv.push("--lazy");
            }
            let o = cl.coord(2, &argv);
            assert!(o.status.success(), "streamed migrate failed");
            let s = json_of(&o);
            let streamed_total = t.elapsed().as_secs_f64() * 1e3;
            // Post-copy: the target still fetches the last pages from the
            // source meanwhile; the next move must not compete with it.
            let holds = || {
                std::fs::read_dir("/dev/shm/ckpt-held")
                    .map(|rd| {
                        rd.flatten().any(|e| {
                            e.file_name()
                                .to_string_lossy()
                                .starts_with(&format!("{job}."))
                        })
                    })
                    .unwrap_or(false)
            };
            assert!(
                wait_for(Duration::from_secs(300), || !holds()),
                "the source still holds pages 300 s after the move"
            );
            prewarm((mib as usize) << 20);
            let o = cl.coord(2, &["--json", "migrate", &job, "--to", back, "--via-store"]);
            assert!(o.status.success(), "migrate --via-store failed");
            let v = json_of(&o);
            let rounds: Vec<String> = s["precopy"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| format!("{} MiB", r["pages_bytes"].as_u64().unwrap() >> 20))
                .collect();
            let last = s["final_level"]["pages_bytes"].as_u64().unwrap() >> 20;
            let (sf, vf) = (
                s["frozen_ms"].as_f64().unwrap(),
                v["frozen_ms"].as_f64().unwrap(),
            );
            eprintln!(
                "  {gib} GiB #{rep}: streamed: pre-copy [{}], final {last} MiB, frozen {sf:.0} ms, \
                 total {streamed_total:.0} ms | through the store: frozen {vf:.0} ms | ratio {:.2}",
                rounds.join(", "),
                sf / vf
            );
            rows.push(serde_json::json!({
                "size_gib": gib, "rep": rep, "hot_mib": args.hot_mib,
                "streamed": s, "via_store": v,
                "streamed_frozen_ms": sf, "store_frozen_ms": vf,
            }));
        }
        let o = cl.coord(2, &["kill", &job]);
        assert!(o.status.success(), "kill failed");
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({"bench": "migrate", "prewarmed": true, "rows": rows})
        );
    }
    // CKPT_BENCH_KEEP_LOGS=DIR keeps the agents' logs (with CKPT_LOG=debug:
    // the phases of every dump and restore) for a look at where time goes.
    if let Some(keep) = std::env::var_os("CKPT_BENCH_KEEP_LOGS") {
        let keep = std::path::PathBuf::from(keep);
        std::fs::create_dir_all(&keep).unwrap();
        for e in std::fs::read_dir(&cl.dir.path).unwrap().flatten() {
            if e.file_name().to_string_lossy().ends_with(".err") {
                std::fs::copy(e.path(), keep.join(e.file_name())).unwrap();
            }
        }
    }
    let CoordCluster { lab, agents, .. } = cl;
    drop(agents);
    lab.down().unwrap();
}
