use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(key = "product:<id>", refresh = "often")]
struct Product {
    id: i64,
}

#[derive(CachedEntity)]
#[cached_entity(key = "category:<id>", refresh = "0s")]
struct Category {
    id: i64,
}

fn main() {}
