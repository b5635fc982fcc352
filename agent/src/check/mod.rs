//! `ckpt-agent check`: probes of every kernel feature the engine uses.
