//! The SQLite database side of capture: the outbox, the row triggers and the rendering of outbox rows into
//! keys.
//!
//! # Design
//!
//! - **Row triggers write raw values, not keys.** SQLite has no procedural language in which to port the
//!   percent-escaping of [`crate::KeyWriter`] reliably, so each registered table gets `FOR EACH ROW`
//!   triggers (`cache_invalidation_<table>_insert` / `_update` / `_delete`) that append to
//!   [`OUTBOX`] one row per changed row image: the table name (`tbl`) and a JSON object (`image`) of the row's
//!   *placeholder columns* (the union of the columns read by the templates of every entity of the table).
//!   An `UPDATE` writes the old image always and the new image only when a placeholder column changed.
//!   A fourth, `_replace` (`BEFORE INSERT`), writes the image of an existing row with the new row's own-key
//!   values: the row a `REPLACE` deletes, whose delete trigger SQLite fires only with `recursive_triggers`.
//!   Text columns holding a BLOB (sqlx stores `uuid::Uuid` as 16 bytes) are written as `{"blob": "<HEX>"}`,
//!   because `json_object` rejects BLOBs.
//! - **Keys are rendered in Rust.** `render::Renderer` turns an image into [`crate::KeyValue`]s and renders them
//!   with [`Template::render`], the very code that renders the keys on the Rust side, so both agree byte for
//!   byte (a 16-byte BLOB becomes the lower-case hyphenated UUID text that `uuid::Uuid` renders).
//! - **Outbox ids are in commit order.** SQLite has a single writer: transactions commit one after the
//!   other, and `AUTOINCREMENT` never reuses an id, so a higher id was committed later.
//! - **No `LISTEN`/`NOTIFY`.** SQLite cannot signal another connection: the runtime polls the outbox.
//!
//! [`SqliteSchema::install`] runs [`SqliteSchema::sql`] in one transaction after checking the tables and placeholder columns, dropping
//! the triggers of tables no longer registered; [`SqliteSchema::verify`] checks the recorded fingerprint
//! and version.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use sqlx::{Connection as _, SqliteConnection};

use crate::backend::{all_or_nothing, ident, literal};
use crate::entity::EntityMeta;
use crate::error::{ColumnProblem, Error, Problem};
use crate::key::PartKind;
use crate::registry::Registry;

/// The outbox table: one row per captured row image.
pub(crate) const OUTBOX: &str = outbox!();

/// The table recording the fingerprint and version of the installed triggers.
pub(crate) const INSTALLED: &str = "cache_invalidation_installed";

/// The table recording the highest store sequence of a delivery no longer in [`REPLAY`] (purged, or
/// recorded by schema version 2): a store that forgot invalidations back below it cannot be repaired by a
/// replay (see `Store::sequence`).
pub(crate) const ACKNOWLEDGED: &str = "cache_invalidation_acknowledged";

/// The replay window: the outbox rows of each delivery, with the store's sequence after it, kept after
/// they are deleted (see `RelayConfig::replay_window`).
pub(crate) const REPLAY: &str = "cache_invalidation_replay";

/// The version of the generated SQLite SQL; an installed schema of another version must be re-installed.
pub(crate) const SQLITE_SCHEMA_VERSION: i32 = 3;

/// The prefix of every trigger this module creates.
const TRIGGER_PREFIX: &str = "cache_invalidation_";

/// The trigger suffixes, one per operation.
const OPERATIONS: [&str; 4] = ["insert", "update", "delete", "replace"];

/// The SQLite SQL generated from a [`Registry`]: install it, check it, or export it.
///
/// # Examples
///
/// ```
/// use cache_runtime::{CachedEntity, Registry};
/// use cache_runtime::backend::sqlite::SqliteSchema;
///
/// #[derive(CachedEntity)]
/// #[cached_entity(table = "products", key = "product:<id>")]
/// struct Product {
///     id: i64,
/// }
///
/// let sql = SqliteSchema::new(&Registry::new([Product::META])).sql();
/// assert!(sql.contains("CREATE TRIGGER \"cache_invalidation_products_insert\""));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct SqliteSchema<'r> {
    registry: &'r Registry,
}

impl<'r> SqliteSchema<'r> {
    /// The schema of `registry`.
    pub fn new(registry: &'r Registry) -> Self {
        Self { registry }
    }

    /// The install script (outbox, installed row, row triggers): idempotent, to run in one transaction,
    /// e.g. as a `sqlx migrate` migration. It does not drop triggers of tables no longer registered, nor
    /// check the columns: [`install`](Self::install) does both.
    pub fn sql(&self) -> String {
        sql(self.registry)
    }

    /// Writes [`sql`](Self::sql) into `dir` as a migration for `sqlx migrate`, as
    /// [`PgSchema::write_migration`](crate::backend::postgres::PgSchema::write_migration) does (same naming,
    /// idempotent), and returns its path.
    ///
    /// # Errors
    ///
    /// [`Error::Migration`] when `dir` cannot be created or read, or the file cannot be written.
    pub fn write_migration(
        &self,
        dir: impl AsRef<std::path::Path>,
    ) -> Result<std::path::PathBuf, Error> {
        let fingerprint = self.registry.fingerprint();
        crate::backend::migration::write(
            dir.as_ref(),
            &fingerprint,
            SQLITE_SCHEMA_VERSION,
            &self.sql(),
        )
    }

    /// Installs (or updates) the triggers in one `BEGIN IMMEDIATE` transaction: checks the tables and
    /// placeholder columns, drops the triggers of tables no longer registered, runs [`sql`](Self::sql).
    /// SQLite has row triggers only (no trigger mode).
    ///
    /// # Errors
    ///
    /// [`Error::Registry`], [`Error::Columns`] or [`Error::Database`]; nothing is changed then.
    ///
    /// # Cancel safety
    ///
    /// All or nothing: one transaction.
    pub async fn install(&self, conn: &mut SqliteConnection) -> Result<(), Error> {
        install(self.registry, conn).await
    }

    /// Checks that the installed triggers were generated from this registry by this version of the crate.
    ///
    /// # Errors
    ///
    /// [`Error::NotInstalled`], [`Error::SchemaVersionMismatch`] or [`Error::FingerprintMismatch`];
    /// [`Error::Database`] when a query fails.
    ///
    /// # Cancel safety
    ///
    /// Read-only; dropping the future has no effect.
    pub async fn verify(&self, conn: &mut SqliteConnection) -> Result<(), Error> {
        verify(self.registry, conn).await
    }
}

/// The whole idempotent install script for `registry`: the outbox and installed tables, the triggers of
/// every registered table (dropped and recreated) and the upsert of the installed row.
///
/// It does not drop the triggers of tables that are no longer registered: `install` does.
fn sql(registry: &Registry) -> String {
    let fingerprint = registry.fingerprint();
    let mut sql = String::with_capacity(4096);
    let _ = write!(
        sql,
        "-- Generated by cache-runtime from the registry with fingerprint {fingerprint} (SQLite schema version \
         {SQLITE_SCHEMA_VERSION}).
CREATE TABLE IF NOT EXISTS {OUTBOX} (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  tbl TEXT NOT NULL,
  image TEXT NOT NULL,
  created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);
CREATE TABLE IF NOT EXISTS {INSTALLED} (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  fingerprint TEXT NOT NULL,
  schema_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS {ACKNOWLEDGED} (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  store_sequence INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS {REPLAY} (
  sequence INTEGER NOT NULL,
  tbl TEXT NOT NULL,
  image TEXT NOT NULL,
  delivered_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS {REPLAY}_sequence ON {REPLAY} (sequence);
CREATE INDEX IF NOT EXISTS {REPLAY}_delivered_at ON {REPLAY} (delivered_at);
"
    );
    for (table, columns) in tables(registry) {
        sql.push_str(&table_sql(table, &columns, &key_columns(registry, table)));
    }
    let _ = writeln!(
        sql,
        "INSERT INTO {INSTALLED} (id, fingerprint, schema_version) VALUES (1, {}, {SQLITE_SCHEMA_VERSION})
  ON CONFLICT (id) DO UPDATE SET fingerprint = excluded.fingerprint, schema_version = excluded.schema_version;",
        literal(&fingerprint)
    );
    sql
}

/// Installs (or re-installs) the outbox and the triggers of `registry`, in one transaction.
///
/// Validates the registry, checks that every registered table and placeholder column exists (reporting every
/// problem at once), drops the `cache_invalidation_%` triggers of tables no longer registered, then runs
/// `sql`. The transaction starts with `BEGIN IMMEDIATE`: it reads the catalog, then writes, and taking the
/// write lock first avoids failing with `SQLITE_BUSY` when another connection writes in between.
///
/// # Errors
///
/// [`Error::Registry`], [`Error::Columns`] or [`Error::Database`]; nothing is changed then.
async fn install(registry: &Registry, conn: &mut SqliteConnection) -> Result<(), Error> {
    registry.validate()?;
    let tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    all_or_nothing(tx, async |tx: &mut SqliteConnection| {
        check_columns(registry, tx).await?;
        drop_stale_triggers(registry, tx).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql(registry)))
            .execute(&mut *tx)
            .await?;
        Ok(())
    })
    .await?;
    tracing::info!(
        fingerprint = %registry.fingerprint(),
        "installed the SQLite cache invalidation triggers"
    );
    Ok(())
}

/// Checks that the installed triggers were generated from `registry` by this version of the crate.
///
/// # Errors
///
/// [`Error::NotInstalled`], [`Error::SchemaVersionMismatch`] or [`Error::FingerprintMismatch`];
/// [`Error::Database`] when a query fails.
async fn verify(registry: &Registry, conn: &mut SqliteConnection) -> Result<(), Error> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
    )
    .bind(INSTALLED)
    .fetch_one(&mut *conn)
    .await?;
    let row: Option<(String, i64)> = if exists {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT fingerprint, schema_version FROM {INSTALLED} WHERE id = 1"
        )))
        .fetch_optional(&mut *conn)
        .await?
    } else {
        None
    };
    check_installed(row, registry, SQLITE_SCHEMA_VERSION)?;
    check_triggers(registry, conn).await
}

/// Every registered table has its triggers (a table dropped and created again, or swapped in with
/// `ALTER TABLE … RENAME`, has none: SQLite drops a table's triggers with it).
async fn check_triggers(registry: &Registry, conn: &mut SqliteConnection) -> Result<(), Error> {
    let present: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger' \
         AND name LIKE 'cache\\_invalidation\\_%' ESCAPE '\\'",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut problems = Vec::new();
    for table in tables(registry).into_keys() {
        let mut expected = vec!["insert", "update", "delete"];
        if !key_columns(registry, table).is_empty() {
            expected.push("replace");
        }
        for op in expected {
            let name = trigger_name(table, op);
            let on_table = present
                .iter()
                .any(|(n, t)| n == &name && t.eq_ignore_ascii_case(table));
            if !on_table {
                problems.push(format!("{table} has no trigger {name}"));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::CaptureBroken(problems))
    }
}

/// Checks what an install recorded (`fingerprint`, `schema_version`; `None` when nothing is installed)
/// against this build's `registry` and the backend's schema `version`.
///
/// # Errors
///
/// [`Error::NotInstalled`], [`Error::SchemaVersionMismatch`] or [`Error::FingerprintMismatch`].
fn check_installed(
    recorded: Option<(String, i64)>,
    registry: &Registry,
    version: i32,
) -> Result<(), Error> {
    let expected = registry.fingerprint();
    match recorded {
        None => Err(Error::NotInstalled { expected }),
        Some((_, installed)) if installed != i64::from(version) => {
            Err(Error::SchemaVersionMismatch {
                installed: i32::try_from(installed).unwrap_or(i32::MAX),
                expected: version,
            })
        }
        Some((installed, _)) if installed != expected => Err(Error::FingerprintMismatch {
            installed,
            expected,
        }),
        Some(_) => Ok(()),
    }
}

/// Every missing table or placeholder column of every entity, in one [`Error::Columns`].
async fn check_columns(registry: &Registry, conn: &mut SqliteConnection) -> Result<(), Error> {
    let mut problems = Vec::new();
    let mut cache: HashMap<&str, Vec<String>> = HashMap::new();
    for entity in registry.entities() {
        if !cache.contains_key(entity.table) {
            // `table_xinfo` also lists generated columns, which triggers can read.
            let names: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_xinfo(?1)")
                .bind(entity.table)
                .fetch_all(&mut *conn)
                .await?;
            cache.insert(entity.table, names);
        }
        let names = cache.get(entity.table).map_or(&[][..], Vec::as_slice);
        let problem = |column: Option<&str>, problem| ColumnProblem {
            entity: entity.type_name.to_owned(),
            table: entity.table.to_owned(),
            column: column.map(str::to_owned),
            problem,
        };
        if names.is_empty() {
            problems.push(problem(None, Problem::MissingTable));
            continue;
        }
        let mut seen = BTreeSet::new();
        for column in placeholder_columns(entity) {
            // SQLite identifiers are case-insensitive for ASCII letters.
            if seen.insert(column.column)
                && !names.iter().any(|n| n.eq_ignore_ascii_case(column.column))
            {
                problems.push(problem(Some(column.column), Problem::MissingColumn));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Columns(problems))
    }
}

/// Drops the triggers this module created on tables that are no longer registered.
async fn drop_stale_triggers(
    registry: &Registry,
    conn: &mut SqliteConnection,
) -> Result<(), Error> {
    let triggers: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger' \
         AND name LIKE 'cache\\_invalidation\\_%' ESCAPE '\\'",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (name, table) in triggers {
        let registered = registry
            .entities()
            .iter()
            .any(|e| e.table.eq_ignore_ascii_case(&table));
        if !registered {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP TRIGGER IF EXISTS {}",
                ident(&name)
            )))
            .execute(&mut *conn)
            .await?;
            tracing::info!(trigger = %name, table = %table, "dropped the trigger of an unregistered table");
        }
    }
    Ok(())
}

/// The columns an entity's templates read, in template order (may repeat).
fn placeholder_columns(
    entity: &EntityMeta,
) -> impl Iterator<Item = &'static crate::entity::Column> + '_ {
    entity
        .templates()
        .flat_map(|t| t.placeholders())
        .filter_map(|field| entity.column(field))
}

/// Each registered table with the union of its entities' placeholder columns (sorted, deduplicated) and
/// their kind (`Text` when any entity reads the column as text: the BLOB wrapping is harmless otherwise).
fn tables(registry: &Registry) -> BTreeMap<&'static str, BTreeMap<&'static str, PartKind>> {
    let mut out: BTreeMap<&'static str, BTreeMap<&'static str, PartKind>> = BTreeMap::new();
    for entity in registry.entities() {
        let columns = out.entry(entity.table).or_default();
        for column in placeholder_columns(entity) {
            let kind = columns.entry(column.column).or_insert(column.kind);
            if column.kind == PartKind::Text {
                *kind = PartKind::Text;
            }
        }
    }
    out
}

/// The column sets of the own keys of `table`'s entities (each entity's `key` placeholders), deduplicated.
fn key_columns(registry: &Registry, table: &str) -> BTreeSet<Vec<&'static str>> {
    registry
        .for_table(table)
        .map(|entity| {
            entity
                .key
                .placeholders()
                .filter_map(|field| entity.column(field))
                .map(|c| c.column)
                .collect::<Vec<_>>()
        })
        .filter(|columns| !columns.is_empty())
        .collect()
}

/// The four triggers of one table, dropped and recreated.
///
/// The fourth, `_replace` (`BEFORE INSERT`), captures the image of an existing row with the same own-key
/// values as the new row: the row a `REPLACE` / `INSERT OR REPLACE` deletes. SQLite fires delete triggers
/// for such deletions only on connections with `PRAGMA recursive_triggers = ON` (the wrapper's connections
/// have it; other clients usually do not). It is an index lookup when the key columns are the primary key
/// or unique, as a row's key normally is; a plain insert finds no row and writes nothing.
fn table_sql(
    table: &str,
    columns: &BTreeMap<&str, PartKind>,
    keys: &BTreeSet<Vec<&'static str>>,
) -> String {
    let image = |row: &str| {
        let args: Vec<String> = columns
            .iter()
            .map(|(column, kind)| {
                format!(
                    "{}, {}",
                    literal(column),
                    value_expr(*kind, &format!("{row}.{}", ident(column)))
                )
            })
            .collect();
        format!("json_object({})", args.join(", "))
    };
    let insert = |row: &str| {
        format!(
            "INSERT INTO {OUTBOX} (tbl, image) VALUES ({}, {});",
            literal(table),
            image(row)
        )
    };
    let changed: Vec<String> = columns
        .keys()
        .map(|c| format!("OLD.{0} IS NOT NEW.{0}", ident(c)))
        .collect();
    let update_new = if changed.is_empty() {
        String::new()
    } else {
        format!(
            "\n  INSERT INTO {OUTBOX} (tbl, image) SELECT {}, {} WHERE {};",
            literal(table),
            image("NEW"),
            changed.join(" OR ")
        )
    };
    let quoted = ident(table);
    let mut sql = String::new();
    for op in OPERATIONS {
        let _ = writeln!(
            sql,
            "DROP TRIGGER IF EXISTS {};",
            ident(&trigger_name(table, op))
        );
    }
    let _ = write!(
        sql,
        "CREATE TRIGGER {ins} AFTER INSERT ON {quoted} FOR EACH ROW BEGIN
  {new}
END;
CREATE TRIGGER {upd} AFTER UPDATE ON {quoted} FOR EACH ROW BEGIN
  {old}{update_new}
END;
CREATE TRIGGER {del} AFTER DELETE ON {quoted} FOR EACH ROW BEGIN
  {old}
END;
",
        ins = ident(&trigger_name(table, "insert")),
        upd = ident(&trigger_name(table, "update")),
        del = ident(&trigger_name(table, "delete")),
        new = insert("NEW"),
        old = insert("OLD"),
    );
    sql.push_str(&replace_trigger(table, keys, &image));
    sql
}

/// The `_replace` trigger (`BEFORE INSERT`) of `table`: captures, with `image`, an existing row whose
/// own-key columns (one set per entity, `keys`) equal the new row's: the row a `REPLACE` deletes. Empty
/// when no entity's key has a column.
fn replace_trigger(
    table: &str,
    keys: &BTreeSet<Vec<&'static str>>,
    image: &dyn Fn(&str) -> String,
) -> String {
    if keys.is_empty() {
        return String::new();
    }
    let conflicts: Vec<String> = keys
        .iter()
        .map(|key| {
            let equal: Vec<String> = key
                .iter()
                .map(|c| format!("existing.{0} = NEW.{0}", ident(c)))
                .collect();
            format!("({})", equal.join(" AND "))
        })
        .collect();
    format!(
        "CREATE TRIGGER {rep} BEFORE INSERT ON {quoted} FOR EACH ROW BEGIN
  INSERT INTO {OUTBOX} (tbl, image) SELECT {tbl}, {image} FROM {quoted} AS existing WHERE {conflicts};
END;
",
        rep = ident(&trigger_name(table, "replace")),
        quoted = ident(table),
        tbl = literal(table),
        image = image("existing"),
        conflicts = conflicts.join(" OR "),
    )
}

/// `cache_invalidation_<table>_<op>` (unquoted; quote it with [`ident`]).
fn trigger_name(table: &str, op: &str) -> String {
    format!("{TRIGGER_PREFIX}{table}_{op}")
}

/// The JSON value of a column: the value itself, or `{"blob": HEX}` for a BLOB in a text column.
fn value_expr(kind: PartKind, value: &str) -> String {
    match kind {
        PartKind::Int | PartKind::Bool => value.to_owned(),
        PartKind::Text => format!(
            "CASE WHEN typeof({value}) = 'blob' THEN json_object('blob', hex({value})) ELSE {value} END"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;
    use std::time::Duration;

    use sqlx::ConnectOptions as _;
    use sqlx::sqlite::SqliteConnectOptions;

    use super::*;
    use crate::backend::sqlite::render::{RenderError, Renderer};
    use crate::entity::{Column, EntityMeta};
    use crate::key::{KeyValue, Segment, Template};

    // products: key `product:<id>`, depends `category:<category_id>:products` (nullable column).
    static PRODUCT_KEY: Template = Template::__new(
        "product:<id>",
        "product:<>",
        &[Segment::Lit("product:"), Segment::Placeholder("id")],
    );
    static PRODUCT_CATEGORY: Template = Template::__new(
        "category:<category_id>:products",
        "category:<>:products",
        &[
            Segment::Lit("category:"),
            Segment::Placeholder("category_id"),
            Segment::Lit(":products"),
        ],
    );
    static PRODUCT: EntityMeta = EntityMeta {
        type_name: "Product",
        table: "products",
        key: &PRODUCT_KEY,
        depends: &[&PRODUCT_CATEGORY],
        variants: &[],
        ttl: Duration::from_secs(60),
        columns: &[
            Column {
                field: "id",
                column: "id",
                kind: PartKind::Int,
            },
            Column {
                field: "category_id",
                column: "category_id",
                kind: PartKind::Int,
            },
        ],
    };

    // users: text, bool and a UUID stored as a BLOB, with a renamed column (`org` -> `org_id`).
    static USER_KEY: Template = Template::__new(
        "user:<name>:<active>",
        "user:<>:<>",
        &[
            Segment::Lit("user:"),
            Segment::Placeholder("name"),
            Segment::Lit(":"),
            Segment::Placeholder("active"),
        ],
    );
    static USER_ORG: Template = Template::__new(
        "org:<org>:users",
        "org:<>:users",
        &[
            Segment::Lit("org:"),
            Segment::Placeholder("org"),
            Segment::Lit(":users"),
        ],
    );
    static USER: EntityMeta = EntityMeta {
        type_name: "User",
        table: "users",
        key: &USER_KEY,
        depends: &[&USER_ORG],
        variants: &[],
        ttl: Duration::from_secs(60),
        columns: &[
            Column {
                field: "name",
                column: "name",
                kind: PartKind::Text,
            },
            Column {
                field: "active",
                column: "active",
                kind: PartKind::Bool,
            },
            Column {
                field: "org",
                column: "org_id",
                kind: PartKind::Text,
            },
        ],
    };

    // A table and a column whose names need quoting.
    static WEIRD_KEY: Template = Template::__new(
        "weird:<id>",
        "weird:<>",
        &[Segment::Lit("weird:"), Segment::Placeholder("id")],
    );
    const WEIRD_TABLE: &str = "we\"ird tab'le";
    static WEIRD: EntityMeta = EntityMeta {
        type_name: "Weird",
        table: WEIRD_TABLE,
        key: &WEIRD_KEY,
        depends: &[],
        variants: &[],
        ttl: Duration::from_secs(60),
        columns: &[Column {
            field: "id",
            column: "i\"d 'x",
            kind: PartKind::Text,
        }],
    };

    // Entities whose table or column does not exist.
    static GADGET_KEY: Template = Template::__new(
        "gadget:<missing>",
        "gadget:<>",
        &[Segment::Lit("gadget:"), Segment::Placeholder("missing")],
    );
    static GADGET: EntityMeta = EntityMeta {
        type_name: "Gadget",
        table: "products",
        key: &GADGET_KEY,
        depends: &[],
        variants: &[],
        ttl: Duration::from_secs(60),
        columns: &[Column {
            field: "missing",
            column: "missing_col",
            kind: PartKind::Int,
        }],
    };
    static GHOST_KEY: Template = Template::__new(
        "ghost:<id>",
        "ghost:<>",
        &[Segment::Lit("ghost:"), Segment::Placeholder("id")],
    );
    static GHOST: EntityMeta = EntityMeta {
        type_name: "Ghost",
        table: "ghosts",
        key: &GHOST_KEY,
        depends: &[],
        variants: &[],
        ttl: Duration::from_secs(60),
        columns: &[Column {
            field: "id",
            column: "id",
            kind: PartKind::Int,
        }],
    };

    async fn connect() -> SqliteConnection {
        let mut conn = SqliteConnectOptions::from_str("sqlite::memory:")
            .unwrap()
            .connect()
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE products (id INTEGER PRIMARY KEY, category_id INTEGER, name TEXT);
             CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, active BOOLEAN, org_id BLOB, bio TEXT);
             CREATE TABLE {} ({} TEXT, other TEXT);",
            ident(WEIRD_TABLE),
            ident("i\"d 'x"),
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        conn
    }

    fn all() -> Registry {
        Registry::new([&PRODUCT, &USER, &WEIRD])
    }

    async fn exec(conn: &mut SqliteConnection, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut *conn)
            .await
            .unwrap();
    }

    /// The outbox rows `(tbl, image)` in id order, then empties the outbox.
    async fn take_outbox(conn: &mut SqliteConnection) -> Vec<(String, String)> {
        let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT tbl, image FROM {OUTBOX} ORDER BY id"
        )))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        exec(conn, &format!("DELETE FROM {OUTBOX}")).await;
        rows
    }

    /// The keys of the outbox rows, in order, then empties the outbox.
    async fn take_keys(conn: &mut SqliteConnection, renderer: &Renderer) -> Vec<String> {
        let mut keys = Vec::new();
        for (table, image) in take_outbox(conn).await {
            renderer.keys(&table, &image, &mut keys).unwrap();
        }
        keys
    }

    async fn triggers(conn: &mut SqliteConnection) -> Vec<(String, String)> {
        sqlx::query_as(
            "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger' ORDER BY name",
        )
        .fetch_all(&mut *conn)
        .await
        .unwrap()
    }

    fn pairs(rows: &[(&str, &str)]) -> Vec<(String, String)> {
        rows.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[tokio::test]
    async fn sqlite_install_creates_triggers_and_is_idempotent() {
        let mut conn = connect().await;
        let registry = all();
        install(&registry, &mut conn).await.unwrap();
        install(&registry, &mut conn).await.unwrap();
        verify(&registry, &mut conn).await.unwrap();
        let weird = |op: &str| format!("cache_invalidation_{WEIRD_TABLE}_{op}");
        let mut expected = pairs(&[
            ("cache_invalidation_products_delete", "products"),
            ("cache_invalidation_products_insert", "products"),
            ("cache_invalidation_products_replace", "products"),
            ("cache_invalidation_products_update", "products"),
            ("cache_invalidation_users_delete", "users"),
            ("cache_invalidation_users_insert", "users"),
            ("cache_invalidation_users_replace", "users"),
            ("cache_invalidation_users_update", "users"),
        ]);
        for op in OPERATIONS {
            expected.push((weird(op), WEIRD_TABLE.to_owned()));
        }
        expected.sort();
        assert_eq!(triggers(&mut conn).await, expected);
        let installed: (i64, String, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT count(*), max(fingerprint), max(schema_version) FROM {INSTALLED}"
        )))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(
            installed,
            (1, registry.fingerprint(), i64::from(SQLITE_SCHEMA_VERSION))
        );
        // The script alone is idempotent too (as a migration would run it).
        exec(&mut conn, &sql(&registry)).await;
        assert_eq!(triggers(&mut conn).await, expected);
    }

    #[tokio::test]
    async fn sqlite_insert_update_delete_write_images() {
        let mut conn = connect().await;
        install(&all(), &mut conn).await.unwrap();

        exec(
            &mut conn,
            "INSERT INTO products (id, category_id, name) VALUES (1, 5, 'lamp'), (2, NULL, 'x')",
        )
        .await;
        assert_eq!(
            take_outbox(&mut conn).await,
            pairs(&[
                ("products", r#"{"category_id":5,"id":1}"#),
                ("products", r#"{"category_id":null,"id":2}"#),
            ])
        );

        // A placeholder column changed: old and new image.
        exec(
            &mut conn,
            "UPDATE products SET category_id = 6 WHERE id = 1",
        )
        .await;
        assert_eq!(
            take_outbox(&mut conn).await,
            pairs(&[
                ("products", r#"{"category_id":5,"id":1}"#),
                ("products", r#"{"category_id":6,"id":1}"#),
            ])
        );
        // NULL -> value is a change too (`IS NOT`).
        exec(
            &mut conn,
            "UPDATE products SET category_id = 7 WHERE id = 2",
        )
        .await;
        assert_eq!(take_outbox(&mut conn).await.len(), 2);

        // Only a non-placeholder column changed: the old image alone.
        exec(
            &mut conn,
            "UPDATE products SET name = 'lamp 2' WHERE id = 1",
        )
        .await;
        assert_eq!(
            take_outbox(&mut conn).await,
            pairs(&[("products", r#"{"category_id":6,"id":1}"#)])
        );

        exec(&mut conn, "DELETE FROM products WHERE id = 1").await;
        assert_eq!(
            take_outbox(&mut conn).await,
            pairs(&[("products", r#"{"category_id":6,"id":1}"#)])
        );

        // A BLOB in a text column is wrapped; ids keep increasing (AUTOINCREMENT).
        exec(
            &mut conn,
            "INSERT INTO users (name, active, org_id) VALUES ('a', 1, X'00FF')",
        )
        .await;
        assert_eq!(
            take_outbox(&mut conn).await,
            pairs(&[(
                "users",
                r#"{"active":1,"name":"a","org_id":{"blob":"00FF"}}"#
            )])
        );

        // A rolled back write leaves no row.
        exec(&mut conn, "BEGIN; DELETE FROM users; ROLLBACK;").await;
        assert!(take_outbox(&mut conn).await.is_empty());
    }

    #[tokio::test]
    async fn sqlite_replace_captures_the_row_it_deletes_without_recursive_triggers() {
        // A plain connection, as another client's: recursive triggers off (SQLite's default), so the row a
        // REPLACE deletes fires no delete trigger; the `_replace` trigger captures it before the insert.
        let mut conn = connect().await;
        install(&all(), &mut conn).await.unwrap();
        exec(
            &mut conn,
            "INSERT INTO products (id, category_id, name) VALUES (1, 5, 'lamp')",
        )
        .await;
        let _ = take_outbox(&mut conn).await;
        exec(
            &mut conn,
            "REPLACE INTO products (id, category_id, name) VALUES (1, 6, 'lamp')",
        )
        .await;
        let renderer = Renderer::new(&all());
        let mut keys = take_keys(&mut conn, &renderer).await;
        keys.sort();
        keys.dedup();
        assert_eq!(
            keys,
            ["category:5:products", "category:6:products", "product:1"],
            "old and new row"
        );
        exec(
            &mut conn,
            "INSERT OR REPLACE INTO products (id, category_id, name) VALUES (1, 7, 'l')",
        )
        .await;
        let mut keys = take_keys(&mut conn, &renderer).await;
        keys.sort();
        keys.dedup();
        assert_eq!(
            keys,
            ["category:6:products", "category:7:products", "product:1"]
        );
        // A plain insert of a new row finds no conflicting row: only its own image.
        exec(
            &mut conn,
            "INSERT INTO products (id, category_id, name) VALUES (2, 7, 'm')",
        )
        .await;
        assert_eq!(take_outbox(&mut conn).await.len(), 1);
    }

    #[tokio::test]
    async fn sqlite_created_at_is_unix_seconds() {
        let mut conn = connect().await;
        install(&all(), &mut conn).await.unwrap();
        exec(
            &mut conn,
            "INSERT INTO products (id, category_id) VALUES (1, 1)",
        )
        .await;
        let created_at: f64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT created_at FROM {OUTBOX}"
        )))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((now - created_at).abs() < 5.0, "{created_at} vs {now}");
    }

    #[tokio::test]
    async fn sqlite_keys_render_like_rust() {
        let mut conn = connect().await;
        let registry = all();
        install(&registry, &mut conn).await.unwrap();
        let renderer = Renderer::new(&registry);

        exec(
            &mut conn,
            "INSERT INTO products (id, category_id) VALUES (-3, NULL)",
        )
        .await;
        assert_eq!(
            take_keys(&mut conn, &renderer).await,
            ["product:-3", "category:~:products"]
        );

        exec(
            &mut conn,
            "INSERT INTO users (name, active, org_id) VALUES \
             ('a:b c/é''\"%', 0, X'67E5504410B1426F9247BB680E5FE0C8'), \
             ('plain', 1, 'text-org'), \
             (NULL, NULL, X'ABCD')",
        )
        .await;
        let keys = take_keys(&mut conn, &renderer).await;
        assert_eq!(
            keys,
            [
                "user:a%3Ab%20c%2F%C3%A9%27%22%25:false",
                "org:67e55044-10b1-426f-9247-bb680e5fe0c8:users",
                "user:plain:true",
                "org:text-org:users",
                "user:~:~",
                "org:abcd:users",
            ]
        );
        // Byte for byte what the Rust side renders from the same values.
        let rust = [
            USER_KEY
                .render(&[KeyValue::Text("a:b c/é'\"%".into()), KeyValue::Bool(false)])
                .unwrap(),
            USER_ORG
                .render(&[KeyValue::Text(
                    "67e55044-10b1-426f-9247-bb680e5fe0c8".into(),
                )])
                .unwrap(),
        ];
        assert_eq!(keys[0], rust[0].as_str());
        assert_eq!(keys[1], rust[1].as_str());

        // The old image of a changed bool, then the new one.
        exec(
            &mut conn,
            "UPDATE users SET active = 0 WHERE name = 'plain'",
        )
        .await;
        assert_eq!(
            take_keys(&mut conn, &renderer).await,
            [
                "user:plain:true",
                "org:text-org:users",
                "user:plain:false",
                "org:text-org:users"
            ]
        );
    }

    #[test]
    fn sqlite_renderer_rejects_bad_rows() {
        let renderer = Renderer::new(&all());
        let mut out = Vec::new();
        assert_eq!(
            renderer.keys("nope", "{}", &mut out),
            Err(RenderError::UnknownTable("nope".into()))
        );
        assert!(renderer.keys("products", "not json", &mut out).is_err());
        assert!(renderer.keys("products", "[1]", &mut out).is_err());
        let err = renderer
            .keys("products", r#"{"id":1}"#, &mut out)
            .unwrap_err();
        assert_eq!(
            err,
            RenderError::MissingColumn {
                table: "products".into(),
                column: "category_id"
            }
        );
        assert!(
            renderer
                .keys(
                    "users",
                    r#"{"name":"a","active":1,"org_id":{"blob":"XYZ"}}"#,
                    &mut out
                )
                .is_err()
        );
        assert!(
            renderer
                .keys(
                    "users",
                    r#"{"name":[1],"active":1,"org_id":null}"#,
                    &mut out
                )
                .is_err()
        );
        assert!(out.is_empty(), "nothing appended on error: {out:?}");
        renderer
            .keys(
                "users",
                r#"{"name":1.5,"active":true,"org_id":7}"#,
                &mut out,
            )
            .unwrap();
        assert_eq!(out, ["user:1.5:true", "org:7:users"]);
    }

    #[test]
    fn sqlite_renderer_deduplicates_identical_templates() {
        static PRODUCT_AGAIN: EntityMeta = EntityMeta {
            type_name: "ProductView",
            ..PRODUCT
        };
        let renderer = Renderer::new(&Registry::new([&PRODUCT, &PRODUCT_AGAIN]));
        let mut out = Vec::new();
        renderer
            .keys("products", r#"{"id":1,"category_id":2}"#, &mut out)
            .unwrap();
        assert_eq!(out, ["product:1", "category:2:products"]);
    }

    #[tokio::test]
    async fn sqlite_install_reports_every_missing_column_and_table() {
        let mut conn = connect().await;
        static GADGET_ELSEWHERE: EntityMeta = EntityMeta {
            table: "users",
            ..GADGET
        };
        // GADGET maps `products` with other templates than PRODUCT: the registry conflict comes first.
        let err = install(&Registry::new([&PRODUCT, &GADGET]), &mut conn)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Registry(_)), "{err}");

        let err = install(
            &Registry::new([&GADGET_ELSEWHERE, &GHOST, &PRODUCT]),
            &mut conn,
        )
        .await
        .unwrap_err();
        let Error::Columns(problems) = err else {
            panic!("expected Error::Columns, got {err}");
        };
        assert_eq!(
            problems,
            [
                ColumnProblem {
                    entity: "Ghost".into(),
                    table: "ghosts".into(),
                    column: None,
                    problem: Problem::MissingTable,
                },
                ColumnProblem {
                    entity: "Gadget".into(),
                    table: "users".into(),
                    column: Some("missing_col".into()),
                    problem: Problem::MissingColumn,
                },
            ]
        );
        // Nothing was installed.
        assert!(triggers(&mut conn).await.is_empty());
        assert!(matches!(
            verify(&all(), &mut conn).await,
            Err(Error::NotInstalled { .. })
        ));
    }

    #[tokio::test]
    async fn sqlite_verify() {
        let mut conn = connect().await;
        let registry = all();
        let err = verify(&registry, &mut conn).await.unwrap_err();
        assert!(
            matches!(&err, Error::NotInstalled { expected } if *expected == registry.fingerprint()),
            "{err}"
        );
        install(&registry, &mut conn).await.unwrap();
        verify(&registry, &mut conn).await.unwrap();

        let other = Registry::new([&PRODUCT]);
        let err = verify(&other, &mut conn).await.unwrap_err();
        assert!(
            matches!(&err, Error::FingerprintMismatch { installed, expected }
                if *installed == registry.fingerprint() && *expected == other.fingerprint()),
            "{err}"
        );

        exec(
            &mut conn,
            &format!("UPDATE {INSTALLED} SET schema_version = 99"),
        )
        .await;
        let err = verify(&registry, &mut conn).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::SchemaVersionMismatch {
                    installed: 99,
                    expected: SQLITE_SCHEMA_VERSION
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn sqlite_reinstall_drops_triggers_of_unregistered_tables() {
        let mut conn = connect().await;
        install(&all(), &mut conn).await.unwrap();
        // A trigger of the user's own is left alone.
        exec(
            &mut conn,
            "CREATE TRIGGER mine AFTER INSERT ON users BEGIN SELECT 1; END;",
        )
        .await;
        let registry = Registry::new([&PRODUCT]);
        install(&registry, &mut conn).await.unwrap();
        verify(&registry, &mut conn).await.unwrap();
        assert_eq!(
            triggers(&mut conn).await,
            pairs(&[
                ("cache_invalidation_products_delete", "products"),
                ("cache_invalidation_products_insert", "products"),
                ("cache_invalidation_products_replace", "products"),
                ("cache_invalidation_products_update", "products"),
                ("mine", "users"),
            ])
        );
        exec(
            &mut conn,
            &format!(
                "INSERT INTO users (name) VALUES ('x'); INSERT INTO {} VALUES ('y', 'z')",
                ident(WEIRD_TABLE)
            ),
        )
        .await;
        assert!(take_outbox(&mut conn).await.is_empty());
    }

    #[tokio::test]
    async fn sqlite_quoted_names_end_to_end() {
        let mut conn = connect().await;
        let registry = Registry::new([&WEIRD]);
        install(&registry, &mut conn).await.unwrap();
        install(&registry, &mut conn).await.unwrap();
        let renderer = Renderer::new(&registry);
        let table = ident(WEIRD_TABLE);
        exec(
            &mut conn,
            &format!("INSERT INTO {table} VALUES ('a b', 'o')"),
        )
        .await;
        exec(
            &mut conn,
            &format!("UPDATE {table} SET {} = 'c''d'", ident("i\"d 'x")),
        )
        .await;
        exec(&mut conn, &format!("UPDATE {table} SET other = 'p'")).await;
        exec(&mut conn, &format!("DELETE FROM {table}")).await;
        assert_eq!(
            take_keys(&mut conn, &renderer).await,
            [
                "weird:a%20b",
                "weird:a%20b",
                "weird:c%27d",
                "weird:c%27d",
                "weird:c%27d"
            ]
        );
    }
}
