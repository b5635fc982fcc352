//! ckpt-agent: kernel probing, freezing and seizing, and the dump and restore
//! of every kernel object a job holds.
//!
//! `sys` is the only place with `unsafe`: raw syscalls and ioctls that nix
//! does not cover. Every other module is safe Rust, one per kernel object,
//! each holding both the dump and the restore of its object.

pub mod check;
pub mod sys;
