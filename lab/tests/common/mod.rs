//! Helpers shared by the lab tests. They check the machine with `ip` and the file system
//! directly rather than through the library, so a library bug cannot hide itself.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ckpt_lab::Node;

/// Fails the test at once when not root, instead of with a confusing `ip` error.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the lab tests create namespaces and routes: run them as root"
    );
}

fn stdout(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What remains of lab `k`, seen with `ip` and the file system.
pub fn remains(k: u8) -> Vec<String> {
    let mut v = Vec::new();
    let prefix = format!("ckl{k}-");
    for line in stdout("ip", &["netns", "list"]).lines() {
        if line.starts_with(&prefix) {
            v.push(format!("netns {line}"));
        }
    }
    let net = format!("198.18.{k}.0/24");
    for line in stdout("ip", &["route", "show", "type", "prohibit"]).lines() {
        if line.split_whitespace().any(|w| w == net) && line.contains("proto 245") {
            v.push(format!("route {line}"));
        }
    }
    for d in [
        format!("/run/ckpt-lab/{k}"),
        format!("/var/tmp/ckpt-lab-{k}"),
    ] {
        if std::path::Path::new(&d).exists() {
            v.push(d);
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in mounts.lines() {
        if line.contains(&format!("/run/ckpt-lab/{k}/")) {
            v.push(format!("mount {line}"));
        }
    }
    v
}

/// Asserts that nothing of lab `k` is left on the machine.
pub fn assert_gone(k: u8) {
    let r = remains(k);
    assert!(r.is_empty(), "lab {k} left behind: {r:#?}");
}

/// Accepts one connection within 10 s, reads 4 bytes and answers `reply`; returns what it read.
pub fn serve_once(listener: TcpListener, reply: &'static [u8]) -> JoinHandle<io::Result<Vec<u8>>> {
    std::thread::spawn(move || {
        // Non-blocking accept with a deadline: a test whose client failed must not hang here.
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(e),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = vec![0; 4];
        s.read_exact(&mut buf)?;
        s.write_all(reply)?;
        Ok(buf)
    })
}

/// From inside `node`, connects to `to`, sends `msg` (4 bytes) and returns the 4-byte answer.
pub fn exchange(node: &Node, to: SocketAddr, msg: &'static [u8]) -> io::Result<Vec<u8>> {
    node.in_netns(|| -> io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(msg)?;
        let mut buf = vec![0; 4];
        s.read_exact(&mut buf)?;
        Ok(buf)
    })
    .expect("entering the node's network namespace")
}

/// A listener on `addr` (port chosen by the kernel) opened inside the namespace at `netns`.
pub fn listen_in(netns: &std::path::Path, addr: std::net::Ipv4Addr) -> TcpListener {
    ckpt_lab::in_netns_path(netns, || TcpListener::bind((addr, 0)))
        .expect("entering namespace")
        .unwrap_or_else(|e| panic!("listening on {addr}: {e}"))
}

/// Whether nothing answers a TCP connection from `node` to `to` within `within` (a refused
/// connection means something answered, so it does not count).
pub fn unreachable(node: &Node, to: SocketAddr, within: Duration) -> bool {
    node.in_netns(|| match TcpStream::connect_timeout(&to, within) {
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::ConnectionRefused,
    })
    .expect("entering the node's network namespace")
}
