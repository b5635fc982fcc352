//! The thin syscall layer: every raw syscall, ioctl and ptrace request that
//! nix does not wrap. Each `unsafe` block carries a `// SAFETY:` note.

pub mod clone;
pub mod creds;
pub mod gadget;
pub mod ipc;
pub mod misc;
pub mod netlink;
pub mod pagemap;
pub mod pidfd;
pub mod ptrace;

pub use misc::{mmap_files, mmap_readonly, FilesMap};

pub mod probe;
pub mod tcp;
pub mod tty;
pub mod uffd;
