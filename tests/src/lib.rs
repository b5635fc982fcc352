//! Test harness shared by the suites.
