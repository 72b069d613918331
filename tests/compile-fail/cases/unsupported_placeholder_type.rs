use cache_runtime::CachedEntity;

struct Money(i64);

#[derive(CachedEntity)]
#[cached_entity(key = "order:<id>", depends = ["total:<total>"])]
struct Order {
    id: i64,
    total: Money,
}

fn main() {}
