use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(key = "id:<id>")]
struct Id(i64);

fn main() {}
