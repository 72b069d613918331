use cache_runtime::{CachedEntity, key};

#[derive(CachedEntity)]
#[cached_entity(key = "product:<id>", depends = ["category:<category_id>:products"])]
struct Product {
    id: i64,
    category_id: i64,
}

#[derive(CachedEntity)]
#[cached_entity(key = "tenant:<tenant>:user:<handle>")]
struct User {
    tenant: String,
    handle: String,
}

fn main() {
    // A typo in the literal text: no entity declares it, so no write would ever invalidate it.
    let _ = key!("category:<category_id>:product", category_id = 5);
    // `User` declares this shape, but with other placeholder names: the text is what must match.
    let _ = key!("tenant:<org>:user:<handle>", org = "a", handle = "b");
}
