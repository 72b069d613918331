//! A small shop's entities: which keys each row change invalidates, and the checked read-side keys.
//!
//! The capture (PostgreSQL triggers) and read (`get_or_load`) sides are being built; this example grows with
//! them.

use cache_runtime::{CachedEntity, key, registry};

/// A category row.
#[derive(CachedEntity)]
#[cached_entity(table = "categories", key = "category:<id>", depends = ["category:<id>:products"])]
struct Category {
    id: i64,
}

/// A product row.
#[derive(CachedEntity)]
#[cached_entity(key = "product:<id>", depends = ["category:<category_id>:products"], ttl = "10m")]
struct Product {
    id: i64,
    category_id: i64,
}

fn main() {
    if let Err(e) = registry().validate() {
        eprintln!("{e}");
        std::process::exit(1);
    }
    println!(
        "registered entities (fingerprint {}):",
        registry().fingerprint()
    );
    for e in registry().entities() {
        let deps: Vec<_> = e.depends.iter().map(|t| t.text()).collect();
        println!(
            "  {:<10} table {:<11} key {:<16} depends {:?}, ttl {:?}",
            e.type_name,
            e.table,
            e.key.text(),
            deps,
            e.ttl
        );
    }
    let lamp = Product {
        id: 1,
        category_id: 2,
    };
    let keys: Vec<_> = lamp
        .cache_keys()
        .into_iter()
        .map(|k| k.into_string())
        .collect();
    println!("a change of product 1 (category 2) invalidates {keys:?}");
    let kitchen = Category { id: 2 };
    let keys: Vec<_> = kitchen
        .cache_keys()
        .into_iter()
        .map(|k| k.into_string())
        .collect();
    println!("a change of category 2 invalidates {keys:?}");
    println!(
        "the page listing category 2 reads {}",
        key!("category:<category_id>:products", category_id = 2)
    );
}
