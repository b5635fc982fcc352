//! ckpt-agent: kernel probing, freezing and seizing, and the dump and restore
//! of every kernel object a job holds.
//!
//! `sys` is the only place with `unsafe`: raw syscalls and ioctls that nix
//! does not cover. Every other module is safe Rust, one per kernel object,
//! each holding both the dump and the restore of its object.

pub mod cgroup;
pub mod check;
pub mod dump;
pub mod error;
pub mod files;
pub mod held;
pub mod images;
pub mod inet;
pub mod inject;
pub mod ipc;
pub mod job;
pub mod lazy;
pub mod logging;
pub mod mm;
pub mod net;
pub mod netlock;
pub mod ns;
pub mod pages;
pub mod proc;
pub mod progress;
pub mod restore;
pub mod rsh;
pub mod seize;
pub mod serve;
pub mod show;
pub mod snapshot;
pub mod stream;
pub mod sys;
pub mod task;
pub mod track;
pub mod tty;
pub mod unix;
pub mod user;

pub use error::{Error, Result};
