//! Shared entities and helpers of the integration tests. The entities live in this crate so that the tests,
//! which are separate crates, exercise `key!` across crates.
