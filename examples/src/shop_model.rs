//! The shop's model, shared by the `shop` and `shop_http` binaries: the entities, the product page and the
//! tables with their rows.
//!
//! Each binary includes this file as a module of its own (`#[path = "../shop_model.rs"] mod shop_model;`)
//! rather than importing it from the `examples` library: entities declared in the library would be in every
//! binary's build, where `key!("product:<id>", …)` of the benchmarks' own `Product` would find two entities
//! declaring the template, and `export_schema`'s global registry would list them.

use cache_runtime::CachedEntity;
use serde::{Deserialize, Serialize};

/// A category row. A change invalidates `category:<id>` and the category's product list.
#[derive(Debug, Clone, PartialEq, CachedEntity, sqlx::FromRow, Serialize, Deserialize)]
#[cached_entity(table = "categories", key = "category:<id>", depends = ["category:<id>:products"])]
pub(crate) struct Category {
    pub(crate) id: i64,
    pub(crate) name: String,
}

/// A product row. A change invalidates `product:<id>`, its page, and the list of its category (of the old
/// and of the new category when it moves).
#[derive(Debug, Clone, PartialEq, CachedEntity, sqlx::FromRow, Serialize, Deserialize)]
#[cached_entity(
    table = "products",
    key = "product:<id>",
    depends = ["product:<id>:page", "category:<category_id>:products"],
    // Pages of a category's list: variants of its list key, invalidated with it.
    variants = ["category:<category_id>:products:page:<page>"],
    ttl = "10m"
)]
pub(crate) struct Product {
    pub(crate) id: i64,
    pub(crate) category_id: i64,
    pub(crate) name: String,
    pub(crate) price_cents: i64,
}

/// The product page: a product joined with its category.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, Serialize, Deserialize)]
pub(crate) struct Page {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) price_cents: i64,
    pub(crate) category_id: i64,
    pub(crate) category: String,
}

/// The tables and rows of the shop. The same DDL works on PostgreSQL and SQLite.
pub(crate) const SCHEMA: &str = "
    CREATE TABLE categories (id bigint PRIMARY KEY, name text NOT NULL);
    CREATE TABLE products (id bigint PRIMARY KEY, category_id bigint NOT NULL REFERENCES categories (id),
                           name text NOT NULL, price_cents bigint NOT NULL);
    INSERT INTO categories VALUES (1, 'Lamps'), (2, 'Kitchen');
    INSERT INTO products VALUES (1, 1, 'Desk lamp', 4999), (2, 1, 'Floor lamp', 8999),
                                (3, 2, 'Kettle', 2999);";
