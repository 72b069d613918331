//! Prints the install SQL of this program's entities, for a migration tool (`sqlx migrate`, …).
//!
//! Run: `cargo run -p examples --bin export_schema > migrations/0002_cache_invalidation.sql` (PostgreSQL), or
//! with `-- --sqlite` for SQLite.
//! Regenerate it whenever an entity's table, templates or placeholder columns change: connecting with a
//! build whose fingerprint differs from the installed one is an error.

use cache_runtime::backend::postgres::PgSchema;
use cache_runtime::backend::sqlite::SqliteSchema;
use cache_runtime::{CachedEntity, registry};

/// A category row.
#[derive(CachedEntity)]
#[cached_entity(table = "categories", key = "category:<id>", depends = ["category:<id>:products"])]
struct Category {
    id: i64,
}

/// A product row.
#[derive(CachedEntity)]
#[cached_entity(table = "products", key = "product:<id>", depends = ["category:<category_id>:products"])]
struct Product {
    id: i64,
    category_id: i64,
}

fn main() {
    if let Err(e) = registry().validate() {
        eprintln!("{e}");
        std::process::exit(1);
    }
    if std::env::args().any(|a| a == "--sqlite") {
        print!("{}", SqliteSchema::new(registry()).sql());
    } else {
        print!("{}", PgSchema::new(registry()).sql());
    }
}
