use cache_runtime::{CachedEntity, key};

#[derive(CachedEntity)]
#[cached_entity(key = "product:<id>", depends = ["category:<category_id>:products"])]
struct Product {
    id: i64,
    category_id: i64,
}

fn main() {
    // A typo in the literal text: no entity declares it, so no write would ever invalidate it.
    let _ = key!("category:<category_id>:product", category_id = 5);
    // Declared by `tests::model::User` in another crate, but with other placeholder names.
    let _ = key!("tenant:<org>:user:<handle>", org = "a", handle = "b");
}
