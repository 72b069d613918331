use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(key = "product:<id>")]
#[cached_entity(key = "item:<id>", ttl = "1m", ttl = "2m")]
struct Product {
    id: i64,
}

fn main() {}
