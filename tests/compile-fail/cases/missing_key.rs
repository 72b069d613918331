use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(depends = ["category:<category_id>:products"])]
struct Product {
    id: i64,
    category_id: i64,
}

#[derive(CachedEntity)]
struct NoAttribute {
    id: i64,
}

fn main() {}
