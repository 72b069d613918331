//! Compile-fail tests of `#[derive(CachedEntity)]` and `key!` (in `tests/compile_fail.rs`, cases in `cases/`).
//!
//! This library is empty: a package needs a target, and the tests live beside it.
