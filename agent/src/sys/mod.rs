//! The thin syscall layer: every raw syscall, ioctl and ptrace request that
//! nix does not wrap. Each `unsafe` block carries a `// SAFETY:` note.
