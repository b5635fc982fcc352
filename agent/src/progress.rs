//! Progress of long operations (copying pages), reported to whoever runs
//! them: the command line draws a bar on a terminal, libraries and `--json`
//! runs stay quiet.

/// Receives the progress of a long operation.
pub trait Progress: Sync {
    /// A step of `total` units (bytes) begins.
    fn start(&self, what: &str, total: u64);
    /// `n` more units are done.
    fn advance(&self, n: u64);
    /// The step is over.
    fn finish(&self);
}

/// Reports nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}
