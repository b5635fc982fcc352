//! Log output of ckpt's programs (ckpt-agent, ckpt-coord, ckpt-rsh): to
//! stderr, at the level `-v` asks for unless `CKPT_LOG` says otherwise
//! (an EnvFilter), coloured only on a terminal.

/// Installs the logger: warn, or info/debug/trace with `verbose` 1/2/3+.
pub fn init(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CKPT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
