//! `ckpt-rsh`: the remote shell for MPI launchers inside a ckpt job (see
//! `ckpt_agent::rsh`).
//!
//! `ckpt-rsh [OPTIONS] HOST COMMAND...` runs COMMAND on the job's part whose
//! hostname is HOST, as `ssh HOST COMMAND...` would; options an ssh caller
//! may add (`-x`, `-q`, ...) are ignored. `ckpt-rsh --serve [--sessions N]
//! [--port P]` is what that part runs.

use std::process::ExitCode;

const USAGE: &str = "usage: ckpt-rsh HOST COMMAND... | ckpt-rsh --serve [--sessions N] [--port P]";

fn main() -> ExitCode {
    ckpt_agent::logging::init(0);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fail = |msg: String, code: u8| {
        eprintln!("ckpt-rsh: {msg}");
        ExitCode::from(code)
    };
    if args.first().map(String::as_str) == Some("--serve") {
        let mut sessions = None;
        let mut port = ckpt_agent::rsh::port();
        let mut it = args[1..].iter();
        while let Some(a) = it.next() {
            let v = it.next().and_then(|v| v.parse::<u64>().ok());
            match (a.as_str(), v) {
                ("--sessions", Some(n)) => sessions = Some(n as usize),
                ("--port", Some(p)) if p <= u16::MAX as u64 => port = p as u16,
                _ => return fail(format!("bad argument {a:?}\n{USAGE}"), 2),
            }
        }
        return match ckpt_agent::rsh::serve(port, sessions) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e, 1),
        };
    }
    // ssh-style options before the host mean nothing here.
    let mut rest = args.iter().skip_while(|a| a.starts_with('-'));
    let Some(host) = rest.next() else {
        return fail(USAGE.into(), 2);
    };
    let command: Vec<&str> = rest.map(String::as_str).collect();
    if command.is_empty() {
        return fail(format!("no command for {host}\n{USAGE}"), 2);
    }
    match ckpt_agent::rsh::client(host, &command.join(" ")) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => fail(e, 255),
    }
}
