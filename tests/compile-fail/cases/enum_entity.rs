use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(key = "status:<id>")]
enum Status {
    Active,
}

fn main() {}
