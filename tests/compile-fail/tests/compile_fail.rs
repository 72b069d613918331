//! Compile-fail tests of `#[derive(CachedEntity)]` and `key!`: each mistake is a compile error with a span on
//! the offending token and a message that says how to fix it.
//!
//! Every case is in `cases/`, with the exact compiler output beside it (`.stderr`). After a deliberate change
//! of a message, regenerate with `TRYBUILD=overwrite cargo test -p compile-fail` and read the diff. What must
//! compile is tested by ordinary tests (`tests/tests/derive_pass.rs`).

#[test]
fn compile_fail() {
    trybuild::TestCases::new().compile_fail("cases/*.rs");
}
