//! Runs `ckpt-agent check` from the library, as main.rs does:
//! `cargo run -p ckpt-agent --example check_probe -- [--json] [FEATURE...]`.

fn main() {
    let mut json = false;
    let mut features = Vec::new();
    for a in std::env::args().skip(1) {
        if a == "--json" {
            json = true;
        } else {
            features.push(a);
        }
    }
    std::process::exit(ckpt_agent::check::run_cli(json, &features));
}
