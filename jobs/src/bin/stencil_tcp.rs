//! The demo's two-node sample job: the same deterministic 2-D heat equation
//! as `stencil` (Jacobi sweeps on an N x N grid, hot top edge), with the
//! inner rows split between two processes, rank 0 the top half and rank 1
//! the bottom half, which swap their boundary rows over one TCP connection
//! every iteration. The two ranks run on two nodes and are checkpointed and
//! restored on two others, so the connection must survive the move. At the
//! end rank 0 gathers the whole field and prints the same checksum line as
//! `stencil --size N --iters K`, so a run that was moved mid-way can be
//! checked against the single-process solver.
//!
//! Usage: `stencil-tcp --rank 0 --listen ADDR:PORT [--size N] [--iters K]
//! [--every P]` and `stencil-tcp --rank 1 --connect ADDR:PORT [...]`, with
//! the same --size and --iters on both ranks.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const USAGE: &str = concat!(
    "usage: stencil-tcp --rank 0 --listen ADDR:PORT | --rank 1 --connect ADDR:PORT",
    " [--size N] [--iters K] [--every P]"
);

/// How long rank 1 keeps trying to reach rank 0, which may start later.
const CONNECT_FOR: Duration = Duration::from_secs(30);
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// Opens the handshake, so that connecting to something else (or to a
/// different program version) fails at once instead of computing garbage.
const MAGIC: &[u8; 8] = b"STCLTCP1";
const ACK: u8 = b'A';

struct Args {
    rank: usize,
    addr: String,
    size: usize,
    iters: usize,
    every: usize,
}

fn usage_error(msg: &str) -> ! {
    eprintln!("stencil-tcp: {msg}");
    eprintln!("{USAGE}");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let (mut rank, mut listen, mut connect) = (None, None, None);
    let (mut size, mut iters, mut every) = (512, 18000, 1800);
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let Some(v) = it.next() else {
            usage_error(&format!("{k} needs a value"))
        };
        let num = || -> usize {
            v.parse()
                .unwrap_or_else(|_| usage_error(&format!("{k} {v}: not a number")))
        };
        match k.as_str() {
            "--rank" => rank = Some(num()),
            "--listen" => listen = Some(v.clone()),
            "--connect" => connect = Some(v.clone()),
            "--size" => size = num(),
            "--iters" => iters = num(),
            "--every" => every = num(),
            _ => usage_error(&format!("unknown argument {k}")),
        }
    }
    if every == 0 {
        usage_error("--every must be at least 1");
    }
    let addr = match (rank, listen, connect) {
        (Some(0), Some(a), None) => a,
        (Some(1), None, Some(a)) => a,
        (Some(0), _, _) => usage_error("--rank 0 takes --listen ADDR:PORT (and no --connect)"),
        (Some(1), _, _) => usage_error("--rank 1 takes --connect ADDR:PORT (and no --listen)"),
        (Some(r), _, _) => usage_error(&format!("--rank {r}: there are only ranks 0 and 1")),
        (None, _, _) => usage_error("--rank is required"),
    };
    Args {
        rank: rank.unwrap(),
        addr,
        size,
        iters,
        every,
    }
}

/// An io::Error as a lower-case phrase without the "(os error N)" tail, to
/// read well inside our own messages.
fn describe(e: &io::Error) -> String {
    let s = e.to_string();
    let s = match s.find(" (os error ") {
        Some(i) => &s[..i],
        None => &s,
    };
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => s.to_string(),
    }
}

/// Names the failing step; a vanished peer gets its own wording because that
/// is what it nearly always means (the other rank died or was killed).
fn comm_error(what: &str, e: io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        UnexpectedEof => format!("{what}: the peer closed the connection"),
        BrokenPipe | ConnectionReset | ConnectionAborted => {
            format!("{what}: the peer closed the connection ({})", describe(&e))
        }
        _ => format!("{what}: {}", describe(&e)),
    }
}

/// `what` is the step the address is for, to name it in the error.
fn resolve(what: &str, addr: &str) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("{what} {addr}: {}", describe(&e)))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{what} {addr}: the name has no address"));
    }
    Ok(addrs)
}

fn accept_one(addr: &str) -> Result<TcpStream, String> {
    let listener = TcpListener::bind(resolve("listening on", addr)?.as_slice())
        .map_err(|e| format!("listening on {addr}: {}", describe(&e)))?;
    let (conn, _) = listener
        .accept()
        .map_err(|e| format!("accepting on {addr}: {}", describe(&e)))?;
    // Closed once the peer is in: a checkpoint then holds just the one
    // established connection, not also a listener to re-create on restore.
    drop(listener);
    Ok(conn)
}

fn connect_retrying(addr: &str) -> Result<TcpStream, String> {
    let addrs = resolve("connecting to", addr)?;
    let deadline = Instant::now() + CONNECT_FOR;
    loop {
        let mut last = None;
        for a in &addrs {
            // Bounded so that dropped SYNs (the peer's node not up yet)
            // cannot hold us past the deadline.
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(a, left.max(CONNECT_RETRY)) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        if Instant::now() >= deadline {
            let e = last.expect("at least one address");
            return Err(format!(
                "connecting to {addr}: {} after {} s",
                describe(&e),
                CONNECT_FOR.as_secs()
            ));
        }
        std::thread::sleep(CONNECT_RETRY);
    }
}

fn encode(row: &[f64], buf: &mut Vec<u8>) {
    buf.clear();
    for v in row {
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

fn get_row(conn: &mut TcpStream, buf: &mut [u8], row: &mut [f64]) -> io::Result<()> {
    let buf = &mut buf[..row.len() * 8];
    conn.read_exact(buf)?;
    for (v, b) in row.iter_mut().zip(buf.chunks_exact(8)) {
        *v = f64::from_le_bytes(b.try_into().unwrap());
    }
    Ok(())
}

fn header(n: usize, iters: usize) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&(n as u64).to_le_bytes());
    h[16..].copy_from_slice(&(iters as u64).to_le_bytes());
    h
}

/// Both ranks must solve the same problem, or the halves do not fit and the
/// checksum is meaningless; each side reports a mismatch itself.
fn handshake(conn: &mut TcpStream, rank: usize, n: usize, iters: usize) -> Result<(), String> {
    let ours = header(n, iters);
    let mut theirs = [0u8; 24];
    let send = |c: &mut TcpStream| {
        c.write_all(&ours)
            .map_err(|e| comm_error("sending the handshake", e))
    };
    let recv = |c: &mut TcpStream, h: &mut [u8; 24]| {
        c.read_exact(h)
            .map_err(|e| comm_error("receiving the handshake", e))
    };
    if rank == 0 {
        send(conn)?;
        recv(conn, &mut theirs)?;
    } else {
        recv(conn, &mut theirs)?;
        send(conn)?;
    }
    if &theirs[..8] != MAGIC {
        return Err("the peer is not a stencil-tcp of this version (bad handshake)".into());
    }
    let field = |i: usize| u64::from_le_bytes(theirs[i..i + 8].try_into().unwrap());
    let (pn, pk) = (field(8), field(16));
    if (pn, pk) != (n as u64, iters as u64) {
        return Err(format!(
            "the peer solves {pn}x{pn} for {pk} iterations, this rank {n}x{n} for {iters} \
             (give both ranks the same --size and --iters)"
        ));
    }
    Ok(())
}

fn say(args: std::fmt::Arguments) -> Result<(), String> {
    // Explicit flush: the output goes to a file and the process may be
    // killed or moved at any moment, so a line must not sit in a buffer.
    let mut out = io::stdout().lock();
    out.write_fmt(args)
        .and_then(|_| out.write_all(b"\n"))
        .and_then(|_| out.flush())
        .map_err(|e| format!("writing to stdout: {}", describe(&e)))
}

fn run(a: &Args) -> Result<(), String> {
    // As in stencil.rs, so that the two print the same checksum for any --size.
    let n = a.size.max(3);
    let inner = n - 2;
    // Global rows [first, first + own) are this rank's.
    let (first, own) = match a.rank {
        0 => (1, inner / 2),
        _ => (1 + inner / 2, inner - inner / 2),
    };
    let mut conn = if a.rank == 0 {
        accept_one(&a.addr)?
    } else {
        connect_retrying(&a.addr)?
    };
    // Every iteration waits for the peer's row; Nagle's algorithm could hold
    // a row's last partial segment back until an ACK that the peer delays,
    // stalling each iteration for tens of milliseconds.
    conn.set_nodelay(true)
        .map_err(|e| format!("setting TCP_NODELAY: {}", describe(&e)))?;
    handshake(&mut conn, a.rank, n, a.iters)?;

    // Local rows: 0 is the row above ours, 1..=own ours, own + 1 the row
    // below. For rank 0 the one above is the fixed hot edge and the one
    // below the halo from rank 1; for rank 1 the one above is the halo and
    // the one below the fixed cold edge. Both buffers of the double buffer
    // carry the fixed rows, so they never need copying.
    let rows = own + 2;
    let mut grids = [vec![0f64; rows * n], vec![0f64; rows * n]];
    if first == 1 {
        for g in &mut grids {
            g[..n].fill(100.0);
        }
    }
    // The row we send is our outermost one facing the peer (for rank 0 with
    // no rows of its own, the hot edge, which is what rank 1 needs then);
    // the row we receive is the halo on that side.
    let (send_row, recv_row) = if a.rank == 0 { (own, own + 1) } else { (1, 0) };
    let mut out = Vec::with_capacity(n * 8);
    let mut inb = vec![0u8; n * 8];

    let start = Instant::now();
    for it in 0..a.iters {
        let [g0, g1] = &mut grids;
        let (src, dst) = if it % 2 == 0 { (g0, g1) } else { (g1, g0) };
        encode(&src[send_row * n..(send_row + 1) * n], &mut out);
        let halo = &mut src[recv_row * n..(recv_row + 1) * n];
        // One side writes while the other reads, so neither can block in a
        // write with a full socket buffer while its peer does the same,
        // whatever the row length.
        let step = |what, e| comm_error(&format!("iteration {}: {what} the halo row", it + 1), e);
        if a.rank == 0 {
            conn.write_all(&out).map_err(|e| step("sending", e))?;
            get_row(&mut conn, &mut inb, halo).map_err(|e| step("receiving", e))?;
        } else {
            get_row(&mut conn, &mut inb, halo).map_err(|e| step("receiving", e))?;
            conn.write_all(&out).map_err(|e| step("sending", e))?;
        }
        for l in 1..=own {
            let (up, mid, down) = (
                &src[(l - 1) * n..l * n],
                &src[l * n..(l + 1) * n],
                &src[(l + 1) * n..(l + 2) * n],
            );
            let row = &mut dst[l * n..(l + 1) * n];
            // Same operands in the same order as stencil.rs, hence bit for
            // bit the same values.
            for j in 1..n - 1 {
                row[j] = 0.25 * (up[j] + down[j] + mid[j - 1] + mid[j + 1]);
            }
        }
        if a.rank == 0 && (it + 1) % a.every == 0 {
            // Rank 0's row nearest the centre: the true centre may be rank 1's.
            say(format_args!(
                "iter {:>6}  centre {:.9}  elapsed {:.2}s",
                it + 1,
                dst[own * n + n / 2],
                start.elapsed().as_secs_f64()
            ))?;
        }
    }

    let fin = &grids[a.iters % 2];
    // Rank 1 waits for an acknowledgement so that "rank 1 done" means the
    // checksum was printed, and so that neither rank exits while the other
    // still needs the connection.
    if a.rank == 1 {
        // Our rows and the cold edge below them: the rest of the grid.
        encode(&fin[n..], &mut out);
        conn.write_all(&out)
            .map_err(|e| comm_error("sending the final rows", e))?;
        let mut ack = [0u8];
        conn.read_exact(&mut ack)
            .map_err(|e| comm_error("waiting for rank 0's acknowledgement", e))?;
        if ack[0] != ACK {
            return Err(format!("rank 0 acknowledged with {:#04x}", ack[0]));
        }
        return say(format_args!("rank 1 done"));
    }
    let mut whole = fin[..(own + 1) * n].to_vec();
    let theirs = n - 1 - own;
    whole.resize(n * n, 0.0);
    let mut buf = vec![0u8; theirs * n * 8];
    get_row(&mut conn, &mut buf, &mut whole[(own + 1) * n..])
        .map_err(|e| comm_error("receiving rank 1's final rows", e))?;
    // The same sum and FNV-1a over the bits, row-major, as stencil.rs.
    let sum: f64 = whole.iter().sum();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in &whole {
        h = (h ^ v.to_bits()).wrapping_mul(0x0100_0000_01b3);
    }
    say(format_args!(
        "done {} iterations of {n}x{n} in {:.2}s",
        a.iters,
        start.elapsed().as_secs_f64()
    ))?;
    say(format_args!("checksum {h:016x} sum {sum:.6}"))?;
    conn.write_all(&[ACK])
        .map_err(|e| comm_error("sending the acknowledgement", e))
}

fn main() {
    let a = parse_args();
    if let Err(msg) = run(&a) {
        eprintln!("rank {}: {msg}", a.rank);
        std::process::exit(1)
    }
}
