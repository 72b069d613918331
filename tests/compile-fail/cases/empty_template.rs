use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(key = "product:<id>", depends = [""])]
struct Product {
    id: i64,
}

fn main() {}
