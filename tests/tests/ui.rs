//! Compile-fail (and compile-pass) tests of `#[derive(CachedEntity)]` and `key!`: each mistake is a compile
//! error with a span on the offending token and a message that says how to fix it.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("ui/fail/*.rs");
    t.pass("ui/pass/*.rs");
}
