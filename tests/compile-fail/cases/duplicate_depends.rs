use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(
    key = "product:<id>",
    depends = ["category:<category_id>:products", "product:<id>", "category:<category_id>:products"]
)]
struct Product {
    id: i64,
    category_id: i64,
}

fn main() {}
