use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(key = "products")]
struct Product {
    id: i64,
}

fn main() {}
