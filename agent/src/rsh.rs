//! `ckpt-rsh`: the remote shell an MPI launcher uses inside a ckpt job.
//!
//! mpirun starts its daemons on other nodes through an "rsh agent"
//! (`--mca plm_rsh_agent ckpt-rsh`): `ckpt-rsh HOST COMMAND...`. With ssh,
//! the daemon would start outside the job, in the node's namespaces, where
//! no checkpoint can take it along. With ckpt-rsh it starts inside the
//! job's part on that node: each such part runs `ckpt-rsh --serve` (its
//! root process, in the part's namespaces and cgroup), and the client,
//! inside the part that runs mpirun, reaches it over the job's own
//! network. The connection between them is one more TCP connection of the
//! job: it is checkpointed and restored with the rest, so the daemons stay
//! attached to mpirun across a move.
//!
//! The wire format is a stream of frames, each a kind byte, a
//! little-endian u32 length and that many bytes. The client sends the
//! job's token, then the command line, then its stdin; the server relays
//! the command's stdout and stderr and ends with its exit status.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Port the server listens on unless `CKPT_RSH_PORT` says otherwise.
pub const DEFAULT_PORT: u16 = 7100;
/// Largest frame: a command line, or a chunk of output.
const MAX_FRAME: usize = 1 << 20;

/// Frame kinds.
const TOKEN: u8 = b'T';
const COMMAND: u8 = b'C';
const STDIN: u8 = b'I';
const STDIN_EOF: u8 = b'i';
const STDOUT: u8 = b'O';
const STDERR: u8 = b'E';
const EXIT: u8 = b'X';

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: u8, data: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(5 + data.len());
    buf.push(kind);
    buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf)
}

/// Reads one frame; None at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "cut frame")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes: not a ckpt-rsh peer"),
        ));
    }
    let mut data = vec![0u8; len];
    r.read_exact(&mut data)?;
    Ok(Some((head[0], data)))
}

/// The job's token (`CKPT_JOB_TOKEN`, which ckpt-coord launch gives every
/// part): only processes of the job may run commands in its parts.
pub fn token() -> Option<String> {
    std::env::var("CKPT_JOB_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
}

/// The port of the job's rsh servers.
pub fn port() -> u16 {
    std::env::var("CKPT_RSH_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(DEFAULT_PORT)
}

/// Where `host` (a part's hostname, as the MPI host list names it) is
/// reached: `CKPT_RSH_HOSTS` (`host=address,...`, as the job spec sets it)
/// first, then the resolver.
pub fn resolve(host: &str, hosts_var: Option<&str>) -> Option<String> {
    if let Some(list) = hosts_var {
        for entry in list.split(',') {
            if let Some((h, a)) = entry.split_once('=') {
                if h.trim() == host {
                    return Some(a.trim().to_string());
                }
            }
        }
    }
    (host, port())
        .to_socket_addrs()
        .ok()?
        .next()
        .map(|a| a.ip().to_string())
}

/// Runs `command` (a shell command line, as ssh would) on `host`; relays
/// stdin, stdout and stderr; returns its exit status.
pub fn client(host: &str, command: &str) -> Result<i32, String> {
    let addr = resolve(host, std::env::var("CKPT_RSH_HOSTS").ok().as_deref()).ok_or_else(|| {
        format!("{host}: unknown host (name it in CKPT_RSH_HOSTS=host=address,...)")
    })?;
    let target = if addr.contains(':') {
        format!("[{addr}]:{}", port())
    } else {
        format!("{addr}:{}", port())
    };
    // The part on the other node may still be starting.
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match TcpStream::connect(&target) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("{target}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(format!("{host} ({target}): {e}")),
        }
    };
    let _ = stream.set_nodelay(true);
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    write_frame(&mut w, TOKEN, token().unwrap_or_default().as_bytes())
        .and_then(|()| write_frame(&mut w, COMMAND, command.as_bytes()))
        .map_err(|e| format!("{host}: {e}"))?;
    // stdin goes on in the background; the answer ends the session.
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut stdin = io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = write_frame(&mut w, STDIN_EOF, &[]);
                    return;
                }
                Ok(n) => {
                    if write_frame(&mut w, STDIN, &buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut r = stream;
    let (mut out, mut err) = (io::stdout(), io::stderr());
    loop {
        match read_frame(&mut r).map_err(|e| format!("{host}: {e}"))? {
            Some((STDOUT, d)) => {
                let _ = out.write_all(&d).and_then(|()| out.flush());
            }
            Some((STDERR, d)) => {
                let _ = err.write_all(&d).and_then(|()| err.flush());
            }
            Some((EXIT, d)) if d.len() == 4 => {
                return Ok(i32::from_le_bytes(d[..].try_into().expect("4 bytes")))
            }
            Some((k, _)) => return Err(format!("{host}: unexpected frame kind {k}")),
            None => {
                return Err(format!(
                    "{host}: the connection ended before the command did"
                ))
            }
        }
    }
}

/// Serves commands on `port` until `sessions` sessions have ended (None:
/// forever). Each session runs its command with `sh -c` and ends with it;
/// a client that goes away takes its command with it.
pub fn serve(port: u16, sessions: Option<usize>) -> Result<(), String> {
    let listener =
        TcpListener::bind(("::", port)).or_else(|_| TcpListener::bind(("0.0.0.0", port)));
    let listener = listener.map_err(|e| format!("listening on port {port}: {e}"))?;
    let want = token().unwrap_or_default();
    let mut done = 0;
    let mut running = Vec::new();
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept: {e}");
                continue;
            }
        };
        let want = want.clone();
        running.push(std::thread::spawn(move || {
            if let Err(e) = session(stream, &want) {
                tracing::warn!("{e}");
            }
        }));
        if let Some(n) = sessions {
            if running.len() >= n {
                break;
            }
        }
    }
    for t in running {
        let _ = t.join();
        done += 1;
    }
    tracing::debug!(sessions = done, "served");
    Ok(())
}

fn session(stream: TcpStream, want: &str) -> Result<(), String> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let _ = stream.set_nodelay(true);
    let mut r = stream.try_clone().map_err(|e| e.to_string())?;
    match read_frame(&mut r).map_err(|e| format!("{peer}: {e}"))? {
        Some((TOKEN, t)) if t == want.as_bytes() => {}
        _ => {
            let _ = stream.shutdown(Shutdown::Both);
            return Err(format!("{peer}: refused: wrong job token"));
        }
    }
    let command = match read_frame(&mut r).map_err(|e| format!("{peer}: {e}"))? {
        Some((COMMAND, c)) => {
            String::from_utf8(c).map_err(|_| format!("{peer}: command not UTF-8"))?
        }
        _ => return Err(format!("{peer}: no command")),
    };
    tracing::info!(peer, command, "running");
    let mut child = Command::new("/bin/sh")
        .args(["-c", &command])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{peer}: /bin/sh: {e}"))?;
    let w = Arc::new(Mutex::new(stream));
    let relay = |mut from: Box<dyn Read + Send>, kind: u8, w: Arc<Mutex<TcpStream>>| {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let mut s = w.lock().expect("relay lock");
                        if write_frame(&mut *s, kind, &buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        })
    };
    let out = relay(
        Box::new(child.stdout.take().expect("piped")),
        STDOUT,
        w.clone(),
    );
    let err = relay(
        Box::new(child.stderr.take().expect("piped")),
        STDERR,
        w.clone(),
    );
    // The client's stdin, until it ends; then the client's end of the
    // connection: the command goes with it.
    let mut stdin = child.stdin.take();
    let pid = child.id();
    std::thread::spawn(move || loop {
        match read_frame(&mut r) {
            Ok(Some((STDIN, d))) => {
                if let Some(i) = stdin.as_mut() {
                    let _ = i.write_all(&d);
                }
            }
            Ok(Some((STDIN_EOF, _))) => {
                stdin.take();
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return;
            }
        }
    });
    let status = child.wait().map_err(|e| format!("{peer}: {e}"))?;
    let _ = out.join();
    let _ = err.join();
    let code = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    });
    let mut s = w.lock().expect("relay lock");
    write_frame(&mut *s, EXIT, &code.to_le_bytes()).map_err(|e| format!("{peer}: {e}"))?;
    let _ = s.shutdown(Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, COMMAND, b"orted -mca x y").unwrap();
        write_frame(&mut buf, EXIT, &7i32.to_le_bytes()).unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((COMMAND, b"orted -mca x y".to_vec()))
        );
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((EXIT, 7i32.to_le_bytes().to_vec()))
        );
        assert_eq!(read_frame(&mut r).unwrap(), None);
        let cut = &buf[..3];
        assert!(read_frame(&mut &cut[..]).is_err());
        let mut huge = vec![STDOUT];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_frame(&mut &huge[..]).is_err());
    }

    #[test]
    fn hosts_come_from_the_job_spec_first() {
        let hosts = Some("hA=198.18.1.100, hB=198.18.1.101");
        assert_eq!(resolve("hB", hosts).as_deref(), Some("198.18.1.101"));
        assert_eq!(
            resolve("localhost", None)
                .as_deref()
                .map(|a| a.starts_with("127.") || a == "::1"),
            Some(true)
        );
    }
}
