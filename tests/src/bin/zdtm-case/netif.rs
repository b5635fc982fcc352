//! A job's network interfaces seen from inside: names, MACs, MTUs, state,
//! addresses and routes, read with ioctls, getifaddrs and /proc/net (not
//! with the `ip` tool the agent uses), and a TCP peer reached over them.
//! Run by tests/job_net.rs, which runs it on a ckpt-lab node and says what to
//! expect through the environment.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::util::*;
use crate::Ctx;

/// Runs `ip ARGS` (the case adds state of its own that the agent must
/// carry: a secondary address, routes).
fn ip(args: &str) -> CaseResult {
    let bin = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .ok_or("no ip binary")?;
    let out = std::process::Command::new(bin)
        .args(args.split_whitespace())
        .output()
        .map_err(|e| format!("ip {args}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {args}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    r
}

/// `link NAME mac M mtu N up|down` for every interface.
fn links() -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed
    // below; the ioctls fill ifreqs on our stack.
    unsafe {
        let s = cvt(libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0), "socket")?;
        let list = libc::if_nameindex();
        if list.is_null() {
            libc::close(s);
            return Err(os_err("if_nameindex"));
        }
        let mut p = list;
        while (*p).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*p).if_name)
                .to_string_lossy()
                .into_owned();
            let mut r = ifreq(&name);
            let flags = if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut r) == 0 {
                r.ifr_ifru.ifru_flags
            } else {
                0
            };
            let mut r = ifreq(&name);
            let mtu = if libc::ioctl(s, libc::SIOCGIFMTU, &mut r) == 0 {
                r.ifr_ifru.ifru_mtu
            } else {
                -1
            };
            let mut r = ifreq(&name);
            let mac = if libc::ioctl(s, libc::SIOCGIFHWADDR, &mut r) == 0 {
                r.ifr_ifru.ifru_hwaddr.sa_data[..6]
                    .iter()
                    .map(|b| format!("{:02x}", *b as u8))
                    .collect::<Vec<_>>()
                    .join(":")
            } else {
                "?".into()
            };
            let up = if flags & libc::IFF_UP as libc::c_short != 0 {
                "up"
            } else {
                "down"
            };
            out.push((
                name.clone(),
                format!("link {name} mac {mac} mtu {mtu} {up}"),
            ));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
        libc::close(s);
    }
    Ok(out)
}

fn prefix_len(mask: &[u8]) -> u32 {
    mask.iter().map(|b| b.count_ones()).sum()
}

/// `addr NAME ADDRESS/PREFIX` for every IPv4 and IPv6 address except the
/// kernel's link-local ones.
fn addresses() -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list freed below; each sockaddr is read
    // as the type its family says.
    unsafe {
        cvt(libc::getifaddrs(&mut head), "getifaddrs")?;
        let mut p = head;
        while !p.is_null() {
            let a = &*p;
            p = a.ifa_next;
            if a.ifa_addr.is_null() || a.ifa_netmask.is_null() {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(a.ifa_name).to_string_lossy();
            match (*a.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sin = &*(a.ifa_addr as *const libc::sockaddr_in);
                    let mask = &*(a.ifa_netmask as *const libc::sockaddr_in);
                    let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                    let plen = prefix_len(&mask.sin_addr.s_addr.to_ne_bytes());
                    out.push(format!("addr {name} {addr}/{plen}"));
                }
                libc::AF_INET6 => {
                    let sin = &*(a.ifa_addr as *const libc::sockaddr_in6);
                    let mask = &*(a.ifa_netmask as *const libc::sockaddr_in6);
                    let addr = Ipv6Addr::from(sin.sin6_addr.s6_addr);
                    if addr.segments()[0] == 0xfe80 {
                        continue;
                    }
                    let plen = prefix_len(&mask.sin6_addr.s6_addr);
                    out.push(format!("addr {name} {addr}/{plen}"));
                }
                _ => {}
            }
        }
        libc::freeifaddrs(head);
    }
    Ok(out)
}

/// `route4 DEV DST/PLEN via GW metric M flags F` from /proc/net/route (the
/// main table), `route6 ...` from /proc/net/ipv6_route minus the kernel's
/// local, link-local, multicast and null entries.
fn routes() -> Vec<String> {
    let mut out = Vec::new();
    let hex4 = |s: &str| Ipv4Addr::from(u32::from_be(u32::from_str_radix(s, 16).unwrap_or(0)));
    for l in read_text("/proc/net/route").lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let plen = u32::from_str_radix(f[7], 16).unwrap_or(0).count_ones();
        out.push(format!(
            "route4 {} {}/{plen} via {} metric {} flags {}",
            f[0],
            hex4(f[1]),
            hex4(f[2]),
            f[6],
            f[3]
        ));
    }
    let hex6 = |s: &str| Ipv6Addr::from(u128::from_str_radix(s, 16).unwrap_or(0));
    for l in read_text("/proc/net/ipv6_route").lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 10 || f[9] == "lo" || f[1] == "80" {
            continue;
        }
        let dst = hex6(f[0]);
        if dst.segments()[0] == 0xfe80 || dst.segments()[0] >> 8 == 0xff {
            continue;
        }
        out.push(format!(
            "route6 {} {dst}/{} via {} metric {} flags {}",
            f[9],
            u32::from_str_radix(f[1], 16).unwrap_or(0),
            hex6(f[4]),
            u32::from_str_radix(f[5], 16).unwrap_or(0),
            f[8]
        ));
    }
    out
}

/// Everything the job sees of its network, one fact a line, sorted.
fn snapshot() -> Result<Vec<String>, String> {
    let mut v: Vec<String> = links()?.into_iter().map(|(_, l)| l).collect();
    v.extend(addresses()?);
    v.extend(routes());
    v.sort();
    Ok(v)
}

/// Sends `msg` to the echo peer at `peer` and checks it comes back.
fn echo(peer: &str, msg: &str) -> CaseResult {
    let addr: SocketAddr = peer
        .parse()
        .map_err(|e| format!("bad peer {peer:?}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect to {peer}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    s.write_all(msg.as_bytes())
        .map_err(|e| format!("send to {peer}: {e}"))?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf)
        .map_err(|e| format!("echo from {peer}: {e}"))?;
    if buf != msg.as_bytes() {
        return Err(format!(
            "{peer} echoed {:?}, not {msg:?}",
            String::from_utf8_lossy(&buf)
        ));
    }
    Ok(())
}

fn env_list(key: &str) -> Vec<String> {
    std::env::var(key)
        .unwrap_or_default()
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// A job with a veth on a lab bridge (`run --net --veth ...`). The
/// environment gives: CKPT_ZDTM_NET_IP, `ip` commands the case runs first
/// (state only it adds); CKPT_ZDTM_NET_EXPECT, snapshot lines that must be
/// there (what `run` was asked for); CKPT_ZDTM_NET_PEER, an echo server to
/// reach over TCP. After restore the snapshot must be the same, line for
/// line, and the peer reachable again.
pub fn job_net_veth(ctx: &Ctx) -> CaseResult {
    crate::jobs::must_be_job()?;
    let peer = std::env::var("CKPT_ZDTM_NET_PEER")
        .map_err(|_| "CKPT_ZDTM_NET_PEER is not set: tests/job_net.rs runs this case")?;
    for c in env_list("CKPT_ZDTM_NET_IP") {
        ip(&c)?;
    }
    let before = snapshot()?;
    for want in env_list("CKPT_ZDTM_NET_EXPECT") {
        if !before.contains(&want) {
            return Err(format!(
                "expected {want:?} in the job's network; it has: {before:?}"
            ));
        }
    }
    echo(&peer, "before checkpoint")?;
    ctx.ready_and_wait()?;

    let mut c = Check::new();
    match snapshot() {
        Ok(after) => {
            let lost: Vec<&String> = before.iter().filter(|l| !after.contains(l)).collect();
            let new: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
            if !lost.is_empty() || !new.is_empty() {
                c.fail(format!(
                    "network changed across checkpoint: lost {lost:?}, gained {new:?}"
                ));
            }
        }
        Err(e) => c.fail(e),
    }
    c.res(echo(&peer, "after restore"));
    c.finish()
}
