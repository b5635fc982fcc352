//! Sample jobs for ckpt's demo and tests. Each is an ordinary program that
//! knows nothing about checkpointing.
