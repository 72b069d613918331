use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(crate = "cache_runtime::", key = "product:<id>")]
struct Product {
    id: i64,
}

fn main() {}
