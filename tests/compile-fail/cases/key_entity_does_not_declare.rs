use cache_runtime::{CachedEntity, key};

#[derive(CachedEntity)]
#[cached_entity(key = "a:<id>")]
struct A {
    id: i64,
}

#[derive(CachedEntity)]
#[cached_entity(key = "b:<id>")]
struct B {
    id: i64,
}

fn main() {
    // `B` exists and declares "b:<id>", but not "a:<id>".
    let _ = key!(B => "a:<id>", id = 1);
}
