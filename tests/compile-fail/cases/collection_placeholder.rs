use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(key = "order:<id>", depends = ["tags:<tags>", "maybe:<nested>", "pair:<pair>"])]
struct Order {
    id: i64,
    tags: Vec<String>,
    nested: Option<Option<i64>>,
    pair: (i64, i64),
}

fn main() {}
