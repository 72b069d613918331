//! SQLite test databases: a file of its own in the temporary directory, removed on drop.

use std::path::PathBuf;
use std::str::FromStr as _;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

/// A SQLite database file of its own (WAL mode), deleted with its `-wal`/`-shm` files when this guard drops.
#[derive(Debug)]
pub struct TestSqlite {
    /// The database file.
    pub path: PathBuf,
    /// Its connection URL (`sqlite://…`).
    pub url: String,
}

impl TestSqlite {
    /// Creates a fresh, empty database file.
    pub async fn create(hint: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "{}.db",
            crate::unique(&format!("cache_test_{hint}"))
        ));
        let url = format!("sqlite://{}", path.display());
        let this = Self { path, url };
        // Create the file (and switch it to WAL) once, so that every later connection finds it.
        let pool = this.pool().await;
        pool.close().await;
        this
    }

    /// Connect options of this database: created if missing, WAL (readers and the writer do not block each
    /// other; the mode is stored in the file, so every later connection uses it), foreign keys on (sqlx's
    /// default).
    pub fn options(&self) -> SqliteConnectOptions {
        SqliteConnectOptions::from_str(&self.url)
            .unwrap_or_else(|e| panic!("bad SQLite URL {}: {e}", self.url))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
    }

    /// A plain pool on this database: writes through it are what other clients do.
    pub async fn pool(&self) -> SqlitePool {
        SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(self.options())
            .await
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.path.display()))
    }
}

impl Drop for TestSqlite {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.path.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Runs the items it is given once per backend: in a module `postgres` and a module `sqlite`, each with
/// `use super::*;`, the type alias `Db` (the sqlx database) and `TestDatabase` (`tests::TestDb` or
/// `tests::TestSqlite`, which share `create(hint).await`, `url` and `pool().await`) and the constant
/// `BACKEND` (`"postgres"` or `"sqlite"`). Connect a wrapper with
/// `CachedPool::<Db>::options().connect(&db.url, store)`. One test body, two backends.
#[macro_export]
macro_rules! on_both_backends {
    ($($body:tt)*) => {
        mod postgres {
            #![allow(unused_imports, dead_code)]
            use super::*;
            type Db = ::sqlx::Postgres;
            type TestDatabase = ::tests::TestDb;
            const BACKEND: &str = "postgres";
            $($body)*
        }
        mod sqlite {
            #![allow(unused_imports, dead_code)]
            use super::*;
            type Db = ::sqlx::Sqlite;
            type TestDatabase = ::tests::TestSqlite;
            const BACKEND: &str = "sqlite";
            $($body)*
        }
    };
}

/// A folder of its own in the temporary directory (e.g. for migration files), removed on drop.
#[derive(Debug)]
pub struct TestDir {
    /// The folder (not created: the code under test may create it).
    pub path: PathBuf,
}

impl TestDir {
    /// A fresh folder name.
    pub fn new(hint: &str) -> Self {
        let path = std::env::temp_dir().join(crate::unique(&format!("cache_test_{hint}")));
        Self { path }
    }

    /// The names of the files in the folder, sorted.
    pub fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.path.display()))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
