use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(key = "product:<id>", ttl = "10 minutes")]
struct Product {
    id: i64,
}

#[derive(CachedEntity)]
#[cached_entity(key = "category:<id>", ttl = "0s")]
struct Category {
    id: i64,
}

fn main() {}
