use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(key = "row:<id>")]
struct Row<T> {
    id: i64,
    value: T,
}

fn main() {}
