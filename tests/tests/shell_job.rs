//! `--shell-job`: a case whose stdio and controlling terminal are a pty the
//! test holds (the test is its "terminal") is refused by a dump without the
//! flag, naming the terminal, and keeps running; dumped with the flag, it
//! is restored by an agent that leads a session on a new pty, and then
//! reads and writes through that terminal, in its foreground group.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_tests::{agent_binary, become_subreaper, dump, no_checkpoint, pid_exists, Workdir};

const CASE_BIN: &str = env!("CARGO_BIN_EXE_zdtm-case");

/// A pty pair the test allocates; the master is closed on drop (the slave
/// lives only in the children given it).
struct Pty {
    master: OwnedFd,
    slave: PathBuf,
}

impl Pty {
    fn open() -> Pty {
        // SAFETY: plain pty calls; the descriptor is owned at once.
        unsafe {
            let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(m >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
            let master = OwnedFd::from_raw_fd(m);
            assert_eq!(libc::grantpt(m), 0);
            assert_eq!(libc::unlockpt(m), 0);
            let mut name = [0 as libc::c_char; 64];
            assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
            let slave = std::ffi::CStr::from_ptr(name.as_ptr())
                .to_string_lossy()
                .into_owned();
            Pty {
                master,
                slave: PathBuf::from(slave),
            }
        }
    }

    /// Stdio on the slave, for a child.
    fn stdio(&self) -> Stdio {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.slave)
            .expect("open the pty slave");
        Stdio::from(f)
    }

    /// Types `line` and reads the terminal until `want` shows (5 s at most);
    /// returns everything read.
    fn exchange(&self, line: &str, want: &str) -> Result<String, String> {
        let fd = self.master.as_raw_fd();
        // SAFETY: line is a valid buffer.
        let n = unsafe { libc::write(fd, line.as_ptr() as *const libc::c_void, line.len()) };
        assert_eq!(n, line.len() as isize, "write to the pty master");
        Ok(self.read_until(want, Duration::from_secs(5)))
            .and_then(|got| {
                if got.contains(want) {
                    Ok(got)
                } else {
                    Err(got)
                }
            })
            .map_err(|got| format!("typed {line:?}, wanted {want:?}, the terminal showed {got:?}"))
    }

    fn read_until(&self, want: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains(want) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut p = libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd.
            if unsafe { libc::poll(&mut p, 1, left.as_millis().min(100) as i32) } <= 0 {
                continue;
            }
            let mut buf = [0u8; 1024];
            // SAFETY: buf is 1024 bytes.
            let n = unsafe {
                libc::read(
                    self.master.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if n <= 0 {
                // EIO once nobody holds the slave.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            got.extend_from_slice(&buf[..n as usize]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }
}

/// A child that leads a new session with `pty` as stdio and controlling
/// terminal; killed and reaped on drop.
struct OnTerminal(Child);

impl OnTerminal {
    fn spawn(mut cmd: Command, pty: &Pty) -> OnTerminal {
        cmd.stdin(pty.stdio())
            .stdout(pty.stdio())
            .stderr(pty.stdio());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::close_range(3, u32::MAX, 0);
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        OnTerminal(cmd.spawn().expect("spawn on the terminal"))
    }

    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.0.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A restored process (the restoring agent's child, ours if the agent
/// dies): killed on drop unless it exited.
struct Restored(i32);

impl Drop for Restored {
    fn drop(&mut self) {
        // SAFETY: signalling and reaping a process this test restored.
        unsafe {
            if libc::kill(self.0, libc::SIGKILL) == 0 {
                libc::waitpid(self.0, std::ptr::null_mut(), libc::WNOHANG);
            }
        }
    }
}

fn wait_file(p: &Path, child: &mut OnTerminal, what: &str, term: &Pty) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = fs::read_to_string(p) {
            if !s.trim().is_empty() {
                return Ok(s);
            }
        }
        if let Ok(Some(st)) = child.0.try_wait() {
            return Err(format!(
                "{what}: exited ({st}) first; terminal: {:?}",
                term.read_until("\u{0}", Duration::from_millis(200))
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!("{what}: not there after 20 s"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn case_command(dir: &Workdir, name: &str) -> Command {
    let mut cmd = Command::new(CASE_BIN);
    cmd.arg(name)
        .arg("--ready")
        .arg(dir.join("ready"))
        .arg("--result")
        .arg(dir.join("result"))
        .env("CKPT_ZDTM_TMP", dir.join("tmp"));
    cmd
}

#[test]
fn reattaches_to_the_restoring_terminal() {
    become_subreaper();
    let dir = Workdir::new("shell-job");
    let first = Pty::open();
    let mut case = OnTerminal::spawn(case_command(&dir, "shell_job"), &first);
    let pid = case.0.id() as i32;
    wait_file(&dir.join("ready"), &mut case, "case ready", &first).unwrap();
    first.exchange("hello\n", "ECHO:HELLO").unwrap();
    if no_checkpoint() {
        // SAFETY: signalling our child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        assert!(case
            .wait(Duration::from_secs(10))
            .is_some_and(|s| s.success()));
        assert_eq!(
            fs::read_to_string(dir.join("result")).unwrap().trim(),
            "PASS"
        );
        return;
    }

    let images = dir.join("images");
    let refused = dump(pid, &images, &[], &dir);
    let tty = first.slave.to_string_lossy().into_owned();
    assert_eq!(refused.code, Some(1), "{}", refused.describe());
    for word in [tty.as_str(), "--shell-job", &format!("pid {pid}"), "fd 0"] {
        assert!(
            refused.stderr.contains(word),
            "the refusal should name {word}: {}",
            refused.describe()
        );
    }
    assert!(pid_exists(pid), "a refused dump leaves the case running");
    first
        .exchange("still\n", "ECHO:STILL")
        .expect("the case still answers after a refused dump");
    let _ = fs::remove_dir_all(&images);

    let run = dump(pid, &images, &["--shell-job"], &dir);
    assert!(run.ok(), "{}", run.describe());
    assert!(
        case.wait(Duration::from_secs(5)).is_some(),
        "the dumped case is gone"
    );

    // The restorer: an agent leading a session on a new terminal.
    let second = Pty::open();
    let pidfile = dir.join("restore.pid");
    let mut cmd = Command::new(agent_binary());
    cmd.arg("restore")
        .arg("--images")
        .arg(&images)
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--shell-job");
    let mut restorer = OnTerminal::spawn(cmd, &second);
    let got = wait_file(&pidfile, &mut restorer, "restore", &second).unwrap();
    let restored = Restored(got.trim().parse().expect("pid in the pidfile"));
    assert_eq!(restored.0, pid, "restored with its PID");
    if let Err(e) = second.exchange("world\n", "ECHO:WORLD") {
        let fds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| format!("{:?}->{:?}", e.file_name(), fs::read_link(e.path())))
                    .collect()
            })
            .unwrap_or_default();
        panic!(
            "the restored case does not answer on the restoring terminal: {e}\nstat: {}\nfds: {fds:?}\nrestorer stat: {}",
            fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default(),
            fs::read_to_string(format!("/proc/{}/stat", restorer.0.id())).unwrap_or_default()
        );
    }
    first.read_until("\u{0}", Duration::from_millis(10));

    // SAFETY: signalling the restored case.
    unsafe { libc::kill(restored.0, libc::SIGTERM) };
    let st = restorer.wait(Duration::from_secs(20));
    let result = fs::read_to_string(dir.join("result")).unwrap_or_default();
    assert_eq!(
        result.trim(),
        "PASS",
        "restored case's verdict; restorer ended with {st:?}; terminal: {:?}",
        second.read_until("\u{0}", Duration::from_millis(200))
    );
    assert!(
        st.is_some_and(|s| s.success()),
        "the restorer returns the case's exit status: {st:?}"
    );
    drop(restored);
}
