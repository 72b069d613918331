// Two entities declare the identical template text: `Entity =>` says which declaration `key!` checks.
use cache_runtime::{CachedEntity, key};

#[derive(CachedEntity)]
#[cached_entity(key = "a:<id>", depends = ["shared:<cid>"])]
struct A {
    id: i64,
    cid: i64,
}

#[derive(CachedEntity)]
#[cached_entity(key = "b:<id>", depends = ["shared:<cid>"])]
struct B {
    id: i64,
    cid: i64,
}

fn main() {
    let a = key!(A => "shared:<cid>", cid = 1);
    let b = key!(crate::B => "shared:<cid>", cid = 1);
    assert_eq!(a, b);
    assert_eq!(key!(A => "a:<id>", id = 2).as_str(), "a:2");
}
