use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(key = "product:<id>v2", depends = ["pair:<a><b>"])]
struct Product {
    id: i64,
    a: i64,
    b: i64,
}

fn main() {}
