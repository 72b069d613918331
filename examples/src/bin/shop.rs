//! A small shop: placeholder until the capture and read sides land.

use cache_runtime::{CachedEntity, key};

/// A product row.
#[derive(CachedEntity)]
#[cached_entity(key = "product:<id>", depends = ["category:<category_id>:products"], ttl = "10m")]
struct Product {
    id: i64,
    category_id: i64,
}

fn main() {
    let p = Product {
        id: 1,
        category_id: 2,
    };
    for k in p.cache_keys() {
        println!("{k}");
    }
    println!(
        "{}",
        key!("category:<category_id>:products", category_id = 2)
    );
}
