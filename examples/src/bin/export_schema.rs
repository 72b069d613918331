//! Writes the install SQL of this program's entities as a migration for `sqlx migrate`, or prints it.
//!
//! Run: `cargo run -p examples --bin export_schema -- --migration migrations/` writes
//! `migrations/<UTC timestamp>_cache_invalidation_<fingerprint>_v<schema version>.sql` (nothing when that
//! file is already there) and prints its path; add `--sqlite` for SQLite. Without `--migration` the SQL is
//! printed. Run it again whenever an entity's table, templates or placeholder columns change, and commit the
//! new file: connecting with a build whose fingerprint differs from the installed one is an error that says
//! so.

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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sqlite = args.iter().any(|a| a == "--sqlite");
    let dir = match args.iter().position(|a| a == "--migration") {
        Some(at) => match args.get(at + 1) {
            Some(dir) => Some(dir),
            None => {
                eprintln!("usage: export_schema [--sqlite] [--migration <dir>]");
                std::process::exit(2);
            }
        },
        None => None,
    };
    let Some(dir) = dir else {
        if sqlite {
            print!("{}", SqliteSchema::new(registry()).sql());
        } else {
            print!("{}", PgSchema::new(registry()).sql());
        }
        return;
    };
    let written = if sqlite {
        SqliteSchema::new(registry()).write_migration(dir)
    } else {
        PgSchema::new(registry()).write_migration(dir)
    };
    match written {
        Ok(path) => println!("{}", path.display()),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
