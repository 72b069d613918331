//! The PostgreSQL side of capture: the outbox, the SQL key rendering and the triggers, generated from a
//! [`Registry`].
//!
//! # What gets installed
//!
//! Everything lives in the schema [`SCHEMA`] (`cache_invalidation`):
//!
//! - `outbox (id, txid, pid, writer, delivered_to, keys text[], created_at)`: one row per writing
//!   *statement* (statement triggers) holding the distinct keys it invalidates, tagged with the writing
//!   transaction (`pg_current_xact_id()`), the backend and, when the session went through
//!   [`CachedPool`](crate::CachedPool), its consumer's tag (the session setting `cache_invalidation.wrapped`).
//!   The rows are written in the writing transaction, so they commit or roll back (savepoints included) with
//!   the data. `delivered_to` lists the consumers that delivered the row.
//! - `consumers`: the stores the outbox is delivered to (see [`Consumer`](crate::outbox::Consumer)): a
//!   row is deleted once every live consumer delivered it.
//! - `replay (consumer, sequence, keys, delivered_at)`: the replay window, the keys of each delivery with the
//!   store's sequence after it, kept after the rows are deleted (see
//!   [`RelayConfig::replay_window`](crate::outbox::RelayConfig::replay_window)).
//! - `installed`: the [`Registry::fingerprint`] and [`SCHEMA_VERSION`] the triggers were generated from.
//! - the rendering functions `escape_text(text)`, `render_text(text)`, `render_int(bigint)`,
//!   `render_bool(boolean)`, equal byte for byte to the Rust rendering (see [`crate::key::KeyWriter`]).
//! - per registered table, one `SECURITY DEFINER` capture function (with `search_path` pinned to
//!   `pg_catalog, pg_temp`, so a role with only DML rights on its tables writes normally and cannot redirect
//!   the function) and the triggers `cache_invalidation_insert` / `_update` / `_delete` (statement-level with
//!   transition tables by default, see [`TriggerMode`]) and `cache_invalidation_truncate`, which writes the
//!   *shapes* of the entity's templates (`product:<>`): the store invalidates the whole namespace.
//!   The triggers are created on the table and on each of its partitions and inheritance children, `ENABLE
//!   ALWAYS` (they fire with `session_replication_role = replica` too); in statement mode a row trigger
//!   `cache_invalidation_replica`, `ENABLE REPLICA`, captures what logical-replication apply writes (it
//!   fires row triggers only). The trigger DDL of each table is recorded in `captured`, from which
//!   `install_triggers(table)` creates missing triggers, at install and when the DDL guard repairs.
//! - the DDL guard (when the installing role is a superuser): event triggers that install capture on
//!   tables and partitions that appear under a registered name, refuse `DISABLE TRIGGER` on capture, and
//!   invalidate a table's namespaces on `DETACH`, rewrites and drops (see `ddl.sql`).
//! - functions the runtime calls (all `SECURITY DEFINER`): `transaction_keys()`, `session_keys()`,
//!   `claim_rows(int, interval, bigint, text)` (a consumer's undelivered rows with their ages, or every
//!   such row up to an id whatever its age: the drain after a store outage), `delivered(bigint[],
//!   text, bigint)` (which records the delivered keys with the store's sequence in the replay window),
//!   `acknowledged(text)` (the highest sequence recorded), `invalidate(text[])` (keys written to the
//!   outbox by hand, see [`CachedPool::invalidate`](crate::CachedPool::invalidate)), `replay_keys(text, bigint, integer)`,
//!   `cut_replay(text, bigint)` and `purge_replay(text, interval)` (the replay window, see
//!   [`RelayConfig::replay_window`](crate::outbox::RelayConfig::replay_window)), `register(text, text, interval, text)` and `prune()` (a consumer's heartbeat), `backlog(text)` (a consumer's
//!   depth, the highest id, its oldest row's age, the outbox's size and the live consumers: the relay's
//!   gauges), `max_id()` (the post-outage watermark, an index lookup) and `pending_upto(bigint, text)` (a
//!   consumer's rows up to an id still undelivered).
//!   They are revoked from `PUBLIC`: only the installing role and roles granted with [`PgSchema::grant_sql`]
//!   may call them, so no other role can read or delete undelivered rows.
//!
//! Sessions that are not wrapped (psql, another service, a plain `PgPool`) also `pg_notify` the channel
//! [`NOTIFY_CHANNEL`], on which the relay listens, unless the server allows prepared transactions (a
//! `NOTIFY` makes `PREPARE TRANSACTION` fail; relays then find the rows by their sweep).
//!
//! [`PgSchema::verify`], run by every pool at connect, checks the triggers of every table, partition and
//! child and the connecting role's grants, and refuses broken capture with what to run.
//!
//! # Installing
//!
//! [`PgSchema::install`] runs the install script in one transaction under an advisory lock; it is idempotent.
//! Installs are **additive and owned**: an install replaces the capture of its registry's tables only, and
//! each build (named by its registry's fingerprint) records its entities per table (`capture_parts`), so a
//! table's capture renders the templates of every build that installed it. Two services with disjoint
//! registries keep each other's capture; during a rolling deploy both builds' keys are invalidated until
//! the old build is retired: explicitly ([`PgSchema::retire`]), or by the first install after no process
//! of it ran for a day (pools and relays tell the database once a minute; see
//! [`PgSchema::retire_unseen_after`]). A table no build records any more loses its capture when the last
//! one is retired. The same SQL can be applied by a migration tool (`sqlx migrate`): write
//! [`PgSchema::sql`] into a migration file, and generate a new one whenever the fingerprint changes; that
//! script holds this build's templates only, and refuses to run where another build captures one of its
//! tables with other templates (use `install`, which keeps them).
//!
//! Requires PostgreSQL 13 or later (`xid8`, `pg_current_xact_id`); `MERGE` needs 15.
//!
//! Renaming or dropping a placeholder column after the install makes writes to the table fail (the capture
//! function no longer compiles against it) until the triggers are re-installed: loud, never silently stale.

use std::fmt::Write as _;

use sqlx::PgConnection;

use super::{NOTIFY_CHANNEL, SCHEMA, SCHEMA_VERSION, SEEN_SETTING, WRAPPED_SETTING, function};
use crate::backend::{TriggerMode, all_or_nothing, ident, literal};
use crate::entity::EntityMeta;
use crate::error::{ColumnProblem, Error, Problem};
use crate::key::{NULL_RENDERING, PartKind, Segment, Template};
use crate::registry::{Registry, fnv1a64};

/// Advisory lock key taken by the install (`hashtext`-free constant: "cacheinv" in ASCII).
const INSTALL_LOCK: i64 = 0x6361_6368_6569_6e76;

/// The statement taking the install lock (until the end of the transaction).
pub(super) fn install_lock_sql() -> String {
    format!("SELECT pg_advisory_xact_lock({INSTALL_LOCK})")
}

/// The regular-expression character class of the bytes that render as themselves (ASCII only, evaluated
/// with the `C` collation), from the one definition of the escaping rule.
const UNRESERVED_CLASS: &str = cache_template::SQL_CLASS;

/// The SQL generated from a [`Registry`]: install it, check it, or export it.
///
/// # Examples
///
/// ```
/// use cache_runtime::{CachedEntity, Registry};
/// use cache_runtime::backend::postgres::PgSchema;
///
/// #[derive(CachedEntity)]
/// #[cached_entity(table = "products", key = "product:<id>", depends = ["category:<category_id>:products"])]
/// struct Product {
///     id: i64,
///     category_id: i64,
/// }
///
/// let registry = Registry::new([Product::META]);
/// let sql = PgSchema::new(&registry).sql();
/// assert!(sql.contains("CREATE TABLE IF NOT EXISTS cache_invalidation.outbox"));
/// assert!(sql.contains("REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"));
/// ```
#[derive(Debug, Clone)]
pub struct PgSchema<'r> {
    registry: &'r Registry,
    mode: TriggerMode,
    unseen: std::time::Duration,
}

impl<'r> PgSchema<'r> {
    /// The schema of `registry`, with statement-level triggers.
    pub fn new(registry: &'r Registry) -> Self {
        Self {
            registry,
            mode: TriggerMode::default(),
            unseen: std::time::Duration::from_secs(24 * 3600),
        }
    }

    /// How long a build may go unseen (no running pool or relay of it) before an install retires it
    /// (default 24 hours): during a rolling deploy both builds' keys are invalidated, and the old build's
    /// templates go with the first install after its last process stopped this long ago.
    #[must_use]
    pub fn retire_unseen_after(mut self, unseen: std::time::Duration) -> Self {
        self.unseen = unseen;
        self
    }

    /// Chooses statement- or row-level triggers (they capture the same keys; statement is faster).
    #[must_use]
    pub fn trigger_mode(mut self, mode: TriggerMode) -> Self {
        self.mode = mode;
        self
    }

    /// How long a build may go unseen before an install retires it.
    pub(super) fn unseen_interval(&self) -> std::time::Duration {
        self.unseen
    }

    /// The registry this schema is generated from.
    pub fn registry(&self) -> &'r Registry {
        self.registry
    }

    /// The complete install script: idempotent, to run in one transaction (as [`PgSchema::install`] does, and
    /// as `sqlx migrate` runs a migration). It checks the placeholder columns first and fails with a message
    /// naming table, column and entity.
    pub fn sql(&self) -> String {
        self.script(&self.merged(&[]), true)
    }

    /// Writes [`sql`](Self::sql) into `dir` as a migration for `sqlx migrate` (or
    /// [`sqlx::migrate!`](https://docs.rs/sqlx/latest/sqlx/macro.migrate.html)), named
    /// `<UTC timestamp>_cache_invalidation_<fingerprint>_v<schema version>.sql` with a version above every
    /// migration already in `dir`, and returns its path. Idempotent: when the file of this registry and
    /// schema version is there with the same content, nothing is written and its path is returned. Run it
    /// again (`cargo run --bin export_schema -- --migration migrations/` in the examples) whenever an entity's
    /// table, templates or columns change, or this crate's schema version does, and commit the new file.
    ///
    /// # Errors
    ///
    /// [`Error::Migration`] when `dir` cannot be created or read, or the file cannot be written.
    pub fn write_migration(
        &self,
        dir: impl AsRef<std::path::Path>,
    ) -> Result<std::path::PathBuf, Error> {
        let fingerprint = self.registry.fingerprint();
        crate::backend::migration::write(dir.as_ref(), &fingerprint, SCHEMA_VERSION, &self.sql())
    }

    /// The install script for `tables` (one entity per table, standing for every build that installed
    /// it). `exported`: a script applied without this crate (a migration), which refuses to drop another
    /// build's differing capture of these tables instead of keeping it.
    pub(super) fn script(&self, tables: &[&'static EntityMeta], exported: bool) -> String {
        let mut sql = String::with_capacity(16 * 1024);
        let _ = writeln!(
            sql,
            "-- Generated by cache-runtime from the registry with fingerprint {} (schema version {SCHEMA_VERSION}).\n\
             -- Regenerate (cache_runtime::backend::postgres::PgSchema::sql) whenever an entity's table, templates or columns change.\n\
             SELECT pg_advisory_xact_lock({INSTALL_LOCK});\n\
             -- The event triggers of a previous install stand still while this one runs.\n\
             SELECT set_config('{SCHEMA}.repairing', 'on', true);",
            self.registry.fingerprint()
        );
        sql.push_str(&self.guard_sql());
        sql.push_str(&base_sql());
        let _ = writeln!(
            sql,
            "REVOKE ALL ON FUNCTION {} FROM PUBLIC;",
            CLIENT_FUNCTIONS.join(", ")
        );
        if exported {
            sql.push_str(&self.others_guard_sql());
        }
        for entity in tables {
            sql.push_str(&drop_table_sql(entity.table));
            sql.push_str(&self.table_sql(entity));
            sql.push_str(&self.part_sql(entity.table));
        }
        let _ = writeln!(
            sql,
            "INSERT INTO {SCHEMA}.installed (singleton, fingerprint, schema_version, trigger_mode, installed_at)\n\
             VALUES (true, {}, {SCHEMA_VERSION}, {}, now())\n\
             ON CONFLICT (singleton) DO UPDATE SET fingerprint = EXCLUDED.fingerprint,\n\
             schema_version = EXCLUDED.schema_version, trigger_mode = EXCLUDED.trigger_mode,\n\
             installed_at = EXCLUDED.installed_at;",
            literal(&self.registry.fingerprint()),
            literal(self.mode.as_str()),
        );
        sql
    }

    /// One entity per registered table, standing for this registry's entities of the table and for
    /// `others` (entities other builds recorded for it).
    pub(super) fn merged(&self, others: &[&'static EntityMeta]) -> Vec<&'static EntityMeta> {
        self.tables()
            .into_iter()
            .filter_map(|first| {
                let mut entities: Vec<&'static EntityMeta> =
                    self.registry.for_table(first.table).collect();
                entities.extend(others.iter().copied().filter(|e| e.table == first.table));
                super::records::merge(&entities)
            })
            .collect()
    }

    /// Records this build's entities of `table` (see the `parts` module).
    fn part_sql(&self, table: &str) -> String {
        let entities: Vec<&EntityMeta> = self.registry.for_table(table).collect();
        format!(
            "INSERT INTO {SCHEMA}.capture_parts (tbl, installer, fingerprint, entities, installed_at)
VALUES ({}, {}, {}, {}, now())
ON CONFLICT (tbl, installer) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, entities = EXCLUDED.entities,
  installed_at = EXCLUDED.installed_at, last_seen = now();
",
            literal(table),
            literal(&self.registry.fingerprint()),
            literal(&self.table_fingerprint(table)),
            literal(&super::records::encode(&entities)),
        )
    }

    /// The fingerprint of this registry's capture of `table`.
    pub(super) fn table_fingerprint(&self, table: &str) -> String {
        Registry::new(self.registry.for_table(table)).fingerprint()
    }

    /// For exported scripts: fails when another build recorded a different capture of one of these
    /// tables (the script would drop its keys; `install` keeps them).
    fn others_guard_sql(&self) -> String {
        let values: Vec<String> = self
            .tables()
            .iter()
            .map(|e| {
                format!(
                    "({}, {})",
                    literal(e.table),
                    literal(&self.table_fingerprint(e.table))
                )
            })
            .collect();
        if values.is_empty() {
            return String::new();
        }
        format!(
            "DO $others$
DECLARE r record;
BEGIN
  FOR r IN SELECT p.tbl, p.installer FROM {SCHEMA}.capture_parts p
           JOIN (VALUES {}) AS own(tbl, fingerprint) ON own.tbl = p.tbl
           WHERE p.installer <> {} AND p.fingerprint <> own.fingerprint LOOP
    RAISE EXCEPTION 'cache invalidation: build % also captures table % with other templates; this script would drop its keys', r.installer, r.tbl
      USING HINT = 'Install with PgSchema::install (auto_install), which keeps the keys of every build, or retire that build first (PgSchema::retire).';
  END LOOP;
END
$others$;
",
            values.join(", "),
            literal(&self.registry.fingerprint()),
        )
    }

    /// The statement that lets `role` use the outbox as a [`CachedPool`](crate::CachedPool) or a
    /// [`Relay`](crate::outbox::Relay) does. The installing role has these rights already; any other role the
    /// application connects as needs them (run it once, as the installing role, after [`install`](Self::install)).
    /// Other roles cannot read or delete outbox rows, so they cannot lose an invalidation.
    ///
    /// # Examples
    ///
    /// ```
    /// let sql = cache_runtime::backend::postgres::PgSchema::grant_sql("app");
    /// assert!(sql.starts_with("GRANT USAGE ON SCHEMA cache_invalidation TO \"app\";"));
    /// ```
    pub fn grant_sql(role: &str) -> String {
        format!(
            "GRANT USAGE ON SCHEMA {SCHEMA} TO {role};\nGRANT EXECUTE ON FUNCTION {} TO {role};",
            CLIENT_FUNCTIONS.join(", "),
            role = ident(role),
        )
    }

    /// Installs (or re-installs) the schema in one transaction, under an advisory lock.
    ///
    /// The connection's role must be allowed to create the schema and triggers on the registered tables
    /// (typically the owner of the tables, as for migrations).
    ///
    /// # Errors
    ///
    /// - [`Error::Registry`] when entities contradict each other;
    /// - [`Error::Columns`] when a table or placeholder column is missing or has a type that cannot render as
    ///   its Rust kind (naming table, column and entity);
    /// - [`Error::Database`] for any other database error; nothing is changed then.
    ///
    /// # Cancel safety
    ///
    /// Runs in one transaction: if the future is dropped before the `COMMIT` completed, the transaction is
    /// rolled back and nothing is installed; dropping it afterwards has no effect.
    pub async fn install(&self, conn: &mut PgConnection) -> Result<(), Error> {
        use sqlx::Connection as _;
        self.registry.validate()?;
        all_or_nothing(conn.begin().await?, async |tx: &mut PgConnection| {
            sqlx::query(sqlx::AssertSqlSafe(install_lock_sql()))
                .execute(&mut *tx)
                .await?;
            self.check_columns(tx).await?;
            let others = if Self::parts_installed(tx).await? {
                self.retire_unseen(tx).await?;
                self.others(tx).await?
            } else {
                Vec::new()
            };
            let script = self.script(&self.merged(&others), false);
            sqlx::raw_sql(sqlx::AssertSqlSafe(script))
                .execute(&mut *tx)
                .await?;
            Ok(())
        })
        .await?;
        tracing::info!(
            fingerprint = %self.registry.fingerprint(),
            mode = self.mode.as_str(),
            "installed the cache invalidation triggers"
        );
        Ok(())
    }

    /// Checks that every table of this registry is captured with its templates (recorded by this build, or
    /// identically by another) by this version of the crate, that capture is in place on every registered table and each of its partitions and
    /// inheritance children (each trigger present, `ENABLE ALWAYS`, calling this install's function), and
    /// that the connecting role may use the outbox. A pool runs it at every connect.
    ///
    /// # Errors
    ///
    /// [`Error::NotInstalled`], [`Error::FingerprintMismatch`], [`Error::SchemaVersionMismatch`],
    /// [`Error::CaptureBroken`] (naming each table and trigger) or [`Error::MissingGrants`] (with the
    /// statements to run), each saying what to do; [`Error::Database`] when a query fails.
    ///
    /// # Cancel safety
    ///
    /// Read-only; dropping the future has no effect.
    pub async fn verify(&self, conn: &mut PgConnection) -> Result<(), Error> {
        let exists: bool = sqlx::query_scalar(concat!(
            "SELECT to_regclass('",
            function!("installed"),
            "') IS NOT NULL"
        ))
        .fetch_one(&mut *conn)
        .await?;
        // What each build installed is checked per table (`check_parts`); the singleton row only says which
        // version of this crate's SQL is in place.
        let version: Option<i32> = if exists {
            sqlx::query_scalar(concat!(
                "SELECT schema_version FROM ",
                function!("installed")
            ))
            .fetch_optional(&mut *conn)
            .await?
        } else {
            None
        };
        match version {
            None => {
                return Err(Error::NotInstalled {
                    expected: self.registry.fingerprint(),
                });
            }
            Some(installed) if installed != SCHEMA_VERSION => {
                return Err(Error::SchemaVersionMismatch {
                    installed,
                    expected: SCHEMA_VERSION,
                });
            }
            Some(_) => {}
        }
        self.check_parts(conn).await?;
        self.check_triggers(conn).await?;
        Self::check_grants(conn).await
    }

    /// Every table or placeholder column that is missing or has an incompatible type.
    async fn check_columns(&self, conn: &mut PgConnection) -> Result<(), Error> {
        let Some(query) = self.problems_query() else {
            return Ok(());
        };
        let rows: Vec<(String, String, Option<String>, String)> =
            sqlx::query_as(sqlx::AssertSqlSafe(query))
                .fetch_all(&mut *conn)
                .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let problems = rows
            .into_iter()
            .map(|(entity, table, column, found)| {
                let problem = match found.as_str() {
                    "no table" => Problem::MissingTable,
                    "no column" => Problem::MissingColumn,
                    _ if found.starts_with("case-insensitive ") => Problem::CaseInsensitive {
                        found: found["case-insensitive ".len()..].to_owned(),
                    },
                    _ => Problem::IncompatibleType {
                        found,
                        expected: self.kind_of(&entity, column.as_deref()),
                    },
                };
                ColumnProblem {
                    entity,
                    table,
                    column,
                    problem,
                }
            })
            .collect();
        Err(Error::Columns(problems))
    }

    fn kind_of(&self, entity: &str, column: Option<&str>) -> &'static str {
        self.registry
            .entities()
            .iter()
            .filter(|e| e.type_name == entity)
            .flat_map(|e| e.columns.iter())
            .find(|c| Some(c.column) == column)
            .map_or("?", |c| kind_types(c.kind))
    }

    /// One entity per table (the registry guarantees entities of one table capture the same keys).
    pub(super) fn tables(&self) -> Vec<&'static EntityMeta> {
        let mut out: Vec<&'static EntityMeta> = Vec::new();
        for entity in self.registry.entities() {
            if !out.iter().any(|e| e.table == entity.table) {
                out.push(entity);
            }
        }
        out
    }

    /// A query returning `(entity, table, column, found)` for each problem, or `None` without entities.
    fn problems_query(&self) -> Option<String> {
        let mut values = Vec::new();
        for entity in self.registry.entities() {
            let table = qualified(entity.table);
            values.push(format!(
                "({}, {}, {}, NULL::text, NULL::text)",
                literal(entity.type_name),
                literal(entity.table),
                literal(&table)
            ));
            for column in entity.columns {
                values.push(format!(
                    "({}, {}, {}, {}, {})",
                    literal(entity.type_name),
                    literal(entity.table),
                    literal(&table),
                    literal(column.column),
                    literal(column.kind.name()),
                ));
            }
        }
        if values.is_empty() {
            return None;
        }
        Some(format!(
            "SELECT c.entity, c.tbl, c.col,
                    CASE WHEN to_regclass(c.tbl_q) IS NULL THEN 'no table'
                         WHEN a.attname IS NULL THEN 'no column'
                         WHEN c.kind = 'text' AND (bt.typname = 'citext' OR NOT coalesce(
                                (SELECT co.collisdeterministic FROM pg_catalog.pg_collation co
                                 WHERE co.oid = a.attcollation), true))
                           THEN 'case-insensitive ' || format_type(a.atttypid, a.atttypmod)
                              || coalesce(' COLLATE ' || (SELECT quote_ident(co.collname) FROM pg_catalog.pg_collation co
                                 WHERE co.oid = a.attcollation AND NOT co.collisdeterministic), '')
                         ELSE format_type(a.atttypid, a.atttypmod) END AS found
             FROM (VALUES {}) AS c(entity, tbl, tbl_q, col, kind)
             LEFT JOIN pg_catalog.pg_attribute a
               ON a.attrelid = to_regclass(c.tbl_q) AND a.attname = c.col AND a.attnum > 0 AND NOT a.attisdropped
             LEFT JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
             LEFT JOIN pg_catalog.pg_type bt
               ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
             WHERE (to_regclass(c.tbl_q) IS NULL AND c.col IS NULL)
                OR (to_regclass(c.tbl_q) IS NOT NULL AND c.col IS NOT NULL AND (a.attname IS NULL OR NOT (
                      (c.kind = 'int' AND bt.typname IN ('int2', 'int4', 'int8'))
                   OR (c.kind = 'bool' AND bt.typname = 'bool')
                   OR (c.kind = 'text' AND bt.typname IN ('text', 'varchar', 'uuid', 'name')
                       AND coalesce((SELECT co.collisdeterministic FROM pg_catalog.pg_collation co
                                     WHERE co.oid = a.attcollation), true)))))
             ORDER BY c.tbl, c.col NULLS FIRST, c.entity",
            values.join(",\n")
        ))
    }

    /// A `DO` block failing the script with a clear message when a column is missing (for exported SQL; the
    /// typed check of [`PgSchema::install`] runs first).
    fn guard_sql(&self) -> String {
        let Some(query) = self.problems_query() else {
            return String::new();
        };
        format!(
            "DO $guard$
DECLARE p record;
BEGIN
  FOR p IN {query} LOOP
    IF p.found = 'no table' THEN
      RAISE EXCEPTION 'cache invalidation: table % (entity %) does not exist; create it before installing the triggers, or fix `table = ...` of the entity', p.tbl, p.entity;
    ELSIF p.found = 'no column' THEN
      RAISE EXCEPTION 'cache invalidation: table % has no column % used by a key template of entity %; add the column or fix the placeholder / #[sqlx(rename)]', p.tbl, p.col, p.entity;
    ELSIF p.found LIKE 'case-insensitive %' THEN
      RAISE EXCEPTION 'cache invalidation: column %.% (entity %) is %: equal values can be spelled differently, so a key rendered from one spelling would miss readers of another; key on a text column with a deterministic collation (e.g. a generated column lower(...))', p.tbl, p.col, p.entity, p.found;
    ELSE
      RAISE EXCEPTION 'cache invalidation: column %.% (entity %) has type %, which cannot render like its Rust field; use an integer, boolean, text or uuid column', p.tbl, p.col, p.entity, p.found;
    END IF;
  END LOOP;
END
$guard$;
"
        )
    }

    /// The capture function and triggers of one table, and its `TRUNCATE` trigger.
    pub(super) fn table_sql(&self, entity: &'static EntityMeta) -> String {
        let table = qualified(entity.table);
        let capture = function_name("capture", entity.table);
        let truncate = function_name("truncate", entity.table);
        let mut sql = format!("\n-- table {}, entity {}\n", entity.table, entity.type_name);
        let events = match self.mode {
            TriggerMode::Statement => {
                // Logical-replication apply fires row triggers only: a row trigger enabled in replica mode
                // only (no cost for ordinary writes) captures what a subscription applies.
                let replica = function_name("replica", entity.table);
                let rows = row_events(entity, &replica, REPLICA_TRIGGER, "REPLICA");
                sql.push_str(&capture_function(&replica, &rows));
                Events {
                    row: rows.row,
                    ..statement_events(entity, &capture)
                }
            }
            TriggerMode::Row => row_events(entity, &capture, ROW_TRIGGER, "ALWAYS"),
        };
        sql.push_str(&capture_function(&capture, &events));
        sql.push_str(&truncate_sql(entity, &truncate));
        let shapes: Vec<&str> = entity.templates().map(|t| t.shape()).collect();
        sql.push_str(&triggers_sql(&table, &shapes, &events, &truncate));
        sql
    }
}

/// A capture function: collects the keys of the changed rows by event, and writes them to the outbox.
fn capture_function(name: &str, events: &Events) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {name}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  keys text[];
BEGIN
  IF TG_OP = 'INSERT' THEN
    {ins}
  ELSIF TG_OP = 'UPDATE' THEN
    {upd}
  ELSE
    {del}
  END IF;
  {emit}
  RETURN NULL;
END
$fn$;
",
        ins = events.insert,
        upd = events.update,
        del = events.delete,
        emit = fill(EMIT_SQL),
    )
}

/// Records the trigger DDL of a registered table in `captured` and creates the triggers on it and on every
/// partition and inheritance child it has now (capture must see writes addressed to them directly:
/// statement triggers fire only on the table a statement names). Each trigger is `ENABLE ALWAYS` (or, the
/// replica row trigger, `ENABLE REPLICA`), so that writes with `session_replication_role = replica`
/// (`pg_restore`, migration tools, logical-replication apply) are captured. The event trigger `on_ddl`
/// creates the same triggers, from the same record, on a partition or table that appears later.
fn triggers_sql(table: &str, shapes: &[&str], events: &Events, truncate: &str) -> String {
    let every = format!(
        "{}CREATE TRIGGER {TRUNCATE_TRIGGER} AFTER TRUNCATE ON @rel@ FOR EACH STATEMENT EXECUTE FUNCTION {truncate}();
ALTER TABLE @rel@ {};
",
        events.statement_triggers,
        enable_always(events.statement_names.iter().copied().chain([TRUNCATE_TRIGGER])),
    );
    let row = events.row.as_ref().map_or("NULL".to_owned(), |row| {
        literal(&format!(
            "{}ALTER TABLE @rel@ ENABLE {} TRIGGER {};\n",
            row.ddl, row.enable, row.name
        ))
    });
    let shapes: Vec<String> = shapes.iter().map(|s| literal(s)).collect();
    let tbl = literal(table);
    format!(
        "INSERT INTO {SCHEMA}.captured (tbl, schema_name, table_name, every_ddl, row_ddl, shapes)
SELECT {tbl}, n.nspname, c.relname, {every}, {row}, ARRAY[{shapes}]
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = {tbl}::regclass;
SELECT {SCHEMA}.install_triggers({tbl});
",
        every = literal(&every),
        shapes = shapes.join(", "),
    )
}

/// The triggers each captured relation has in `mode`: name, the prefix of the function it calls, and how
/// it is enabled (`pg_trigger.tgenabled`: `A` always, `R` replica only).
pub(super) fn trigger_names(mode: TriggerMode) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut triggers: Vec<_> = match mode {
        TriggerMode::Statement => STATEMENT_TRIGGERS
            .iter()
            .map(|t| (*t, "capture", "A"))
            .chain([(REPLICA_TRIGGER, "replica", "R")])
            .collect(),
        TriggerMode::Row => vec![(ROW_TRIGGER, "capture", "A")],
    };
    triggers.push((TRUNCATE_TRIGGER, "truncate", "A"));
    triggers
}

/// `ENABLE ALWAYS TRIGGER a, ENABLE ALWAYS TRIGGER b, …`.
fn enable_always<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(|name| format!("ENABLE ALWAYS TRIGGER {name}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The statement triggers of statement mode.
const STATEMENT_TRIGGERS: [&str; 3] = [
    "cache_invalidation_insert",
    "cache_invalidation_update",
    "cache_invalidation_delete",
];
/// The row trigger of row mode.
const ROW_TRIGGER: &str = "cache_invalidation_row";
/// The row trigger of statement mode that fires in replica mode only (logical-replication apply).
const REPLICA_TRIGGER: &str = "cache_invalidation_replica";
/// The `TRUNCATE` trigger of both modes.
const TRUNCATE_TRIGGER: &str = "cache_invalidation_truncate";

/// The key-collecting statement of a capture function for each event, and the triggers calling it (on
/// the relation `@rel@`).
struct Events {
    insert: String,
    update: String,
    delete: String,
    /// Statement triggers, created on the table and on each of its partitions and children.
    statement_triggers: String,
    statement_names: &'static [&'static str],
    /// The row trigger, created on the table and its inheritance children (partitions get clones).
    row: Option<RowTrigger>,
}

/// A row trigger (on the relation `@rel@`) and how it is enabled (`ALWAYS`, or `REPLICA`: only with
/// `session_replication_role = replica`).
struct RowTrigger {
    ddl: String,
    name: &'static str,
    enable: &'static str,
}

/// Statement triggers: per template, the distinct values of its columns in the transition tables (typed,
/// deduplicated before any key is rendered: a 10k-row update renders each distinct key once), rendered.
fn statement_events(entity: &EntityMeta, capture: &str) -> Events {
    // Templates reading the same columns share one deduplication (20 per-category lists: one pass).
    let mut renders: Vec<(String, Vec<String>)> = Vec::new();
    for template in entity.templates() {
        let columns = template_columns(entity, template);
        let expr = template_expr(entity, template, "r.");
        match renders.iter_mut().find(|(c, _)| *c == columns) {
            Some((_, exprs)) if exprs.contains(&expr) => {}
            Some((_, exprs)) => exprs.push(expr),
            None => renders.push((columns, vec![expr])),
        }
    }
    let select = |sources: &[&str]| {
        let parts: Vec<String> = renders
            .iter()
            .map(|(columns, exprs)| {
                let expr = match exprs.as_slice() {
                    [one] => one.clone(),
                    many => format!("unnest(ARRAY[{}])", many.join(", ")),
                };
                let from = match sources {
                    [one] => format!("SELECT DISTINCT {columns} FROM {one}"),
                    many => many
                        .iter()
                        .map(|source| format!("SELECT {columns} FROM {source}"))
                        .collect::<Vec<_>>()
                        .join(" UNION "),
                };
                format!("SELECT {expr} AS k FROM ({from}) AS r")
            })
            .collect();
        format!(
            "SELECT array_agg(d.k) INTO keys FROM ({}) AS d;",
            parts.join(" UNION ALL ")
        )
    };
    Events {
        insert: select(&["new_rows"]),
        update: select(&["old_rows", "new_rows"]),
        delete: select(&["old_rows"]),
        statement_triggers: format!(
            "CREATE TRIGGER cache_invalidation_insert AFTER INSERT ON @rel@
  REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {capture}();
CREATE TRIGGER cache_invalidation_update AFTER UPDATE ON @rel@
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {capture}();
CREATE TRIGGER cache_invalidation_delete AFTER DELETE ON @rel@
  REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {capture}();
"
        ),
        statement_names: &STATEMENT_TRIGGERS,
        row: None,
    }
}

/// Row triggers: the keys of `OLD` and `NEW` per row, by the trigger `name`, enabled `enable`.
fn row_events(
    entity: &EntityMeta,
    capture: &str,
    name: &'static str,
    enable: &'static str,
) -> Events {
    let array = |rows: &[&str]| {
        let exprs: Vec<String> = rows
            .iter()
            .flat_map(|r| entity.templates().map(move |t| template_expr(entity, t, r)))
            .collect();
        format!("keys := ARRAY[{}];", exprs.join(", "))
    };
    Events {
        insert: array(&["NEW."]),
        update: array(&["OLD.", "NEW."]),
        delete: array(&["OLD."]),
        statement_triggers: String::new(),
        statement_names: &[],
        row: Some(RowTrigger {
            ddl: format!(
                "CREATE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE ON @rel@
  FOR EACH ROW EXECUTE FUNCTION {capture}();
"
            ),
            name,
            enable,
        }),
    }
}

/// The `TRUNCATE` capture function of a table: it writes the shapes of the entity's templates
/// (`product:<>`), so the store invalidates whole namespaces.
fn truncate_sql(entity: &EntityMeta, truncate: &str) -> String {
    let shapes = entity
        .templates()
        .map(|t| literal(t.shape()))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "CREATE OR REPLACE FUNCTION {truncate}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  keys text[] := ARRAY[{shapes}];
BEGIN
  {emit}
  RETURN NULL;
END
$fn$;
",
        emit = fill(EMIT_SQL),
    )
}

/// Writes `keys` (when not empty) to the outbox; notifies the relay for sessions that are not wrapped.
const EMIT_SQL: &str = "IF keys IS NOT NULL AND cardinality(keys) > 0 THEN
    INSERT INTO @schema@.outbox (txid, pid, writer, keys, created_at)
    VALUES (pg_current_xact_id(), pg_backend_pid(), nullif(current_setting('@wrapped@', true), ''), keys,
            clock_timestamp());
    -- A NOTIFY makes `PREPARE TRANSACTION` fail: where the server allows prepared transactions, relays find
    -- these rows by their sweep instead.
    IF coalesce(current_setting('@wrapped@', true), '') = ''
       AND current_setting('max_prepared_transactions') = '0' THEN
      PERFORM pg_notify('@channel@', '');
    END IF;
  END IF;";

/// Drops the capture of `table`: every trigger calling one of its functions (on the table, its partitions
/// and children, or a partition detached since), the functions and the recorded trigger DDL. Other tables
/// keep theirs: installs are additive.
pub(super) fn drop_table_sql(table: &str) -> String {
    let functions: Vec<String> = ["capture", "replica", "truncate"]
        .iter()
        .map(|prefix| format!("{}()", function_name(prefix, table)))
        .collect();
    let oids: Vec<String> = functions
        .iter()
        .map(|f| format!("to_regprocedure({})", literal(f)))
        .collect();
    format!(
        "DO $drop$
DECLARE r record;
BEGIN
  FOR r IN SELECT t.tgname, t.tgrelid::regclass::text AS rel FROM pg_catalog.pg_trigger t
           WHERE t.tgfoid IN ({oids}) AND NOT t.tgisinternal AND t.tgparentid = 0 LOOP
    EXECUTE format('DROP TRIGGER %I ON %s', r.tgname, r.rel);
  END LOOP;
END
$drop$;
DROP FUNCTION IF EXISTS {functions};
DELETE FROM {SCHEMA}.captured WHERE tbl = {tbl};
",
        oids = oids.join(", "),
        functions = functions.join(", "),
        tbl = literal(&qualified(table)),
    )
}

/// The functions a client of the outbox calls (the commit path, the relay, the recovery after an outage).
/// They are `SECURITY DEFINER` and can delete outbox rows, so only the installing role and the roles
/// granted with [`PgSchema::grant_sql`] may execute them.
pub(super) const CLIENT_FUNCTIONS: &[&str] = &[
    function!("transaction_keys()"),
    function!("session_keys()"),
    function!("claim_rows(integer, interval, bigint, text)"),
    function!("backlog(text)"),
    function!("max_id()"),
    function!("pending_upto(bigint, text)"),
    function!("delivered(bigint[], text)"),
    function!("delivered(bigint[], text, bigint)"),
    function!("acknowledged(text)"),
    function!("invalidate(text[])"),
    function!("replay_keys(text, bigint, integer)"),
    function!("cut_replay(text, bigint)"),
    function!("purge_replay(text, interval)"),
    function!("register(text, text, interval, text)"),
    function!("unregister(text, text)"),
    function!("prune()"),
    function!("alive(text)"),
];

/// The schema, the tables and the functions that do not depend on the registry: `base.sql`, whose `@name@`
/// tokens stand for the object names, the unreserved character class and the rendering expressions.
fn base_sql() -> String {
    let base = include_str!("base.sql")
        .replace("@written_keys@", &written_keys_sql())
        .replace("@emit@", EMIT_SQL);
    fill(&(base + include_str!("ddl.sql")))
        .replace("@render_text@", &render_expr(PartKind::Text, "v"))
        .replace("@render_int@", &render_expr(PartKind::Int, "v"))
        .replace("@render_bool@", &render_expr(PartKind::Bool, "v"))
}

/// The functions returning the outbox rows a writer delivers: `transaction_keys()` (the rows of the current
/// transaction, read before its `COMMIT`) and `session_keys()` (the rows of this backend, read after an
/// autocommit statement). One loop, two row predicates (each with its own index). Both record the highest id
/// returned in the session setting `@seen@`, so that later statements of the session skip rows already
/// delivered (the setting rolls back with the transaction that set it).
fn written_keys_sql() -> String {
    let rows = [
        (
            "transaction_keys",
            "o.txid = pg_current_xact_id_if_assigned()",
        ),
        ("session_keys", "o.pid = pg_backend_pid() AND o.id > seen"),
    ];
    rows.iter()
        .map(|(name, predicate)| {
            format!(
                "CREATE OR REPLACE FUNCTION @schema@.{name}() RETURNS TABLE (id bigint, keys text[])
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  seen bigint := coalesce(nullif(current_setting('@seen@', true), ''), '0')::bigint;
  r record;
  last bigint;
BEGIN
  FOR r IN SELECT o.id, o.keys FROM @schema@.outbox o WHERE {predicate} ORDER BY o.id LOOP
    id := r.id;
    keys := r.keys;
    last := r.id;
    RETURN NEXT;
  END LOOP;
  IF last IS NOT NULL THEN
    PERFORM set_config('@seen@', last::text, false);
  END IF;
END
$fn$;
"
            )
        })
        .collect()
}

/// Replaces the object-name tokens of generated SQL with the constants: `@schema@`, `@channel@`,
/// `@wrapped@`, `@seen@`, `@unreserved@` (the character class of text that renders as itself).
fn fill(sql: &str) -> String {
    sql.replace("@schema@", SCHEMA)
        .replace("@channel@", NOTIFY_CHANNEL)
        .replace("@wrapped@", WRAPPED_SETTING)
        .replace("@seen@", SEEN_SETTING)
        .replace("@unreserved@", UNRESERVED_CLASS)
}

/// The SQL expression rendering `value` (an expression of the column's type) as a key part.
///
/// The same expression is inlined into the triggers and wrapped in the `render_*` functions the property
/// test compares with the Rust rendering.
fn render_expr(kind: PartKind, value: &str) -> String {
    let null = literal(NULL_RENDERING);
    match kind {
        PartKind::Int => format!("coalesce(({value})::text, {null})"),
        PartKind::Bool => {
            format!(
                "CASE WHEN ({value}) THEN 'true' WHEN NOT ({value}) THEN 'false' ELSE {null} END"
            )
        }
        PartKind::Text => format!(
            "CASE WHEN ({value}) IS NULL THEN {null} \
             WHEN ({value})::text COLLATE \"C\" ~ '^[{UNRESERVED_CLASS}]*$' THEN ({value})::text \
             ELSE {SCHEMA}.escape_text(({value})::text) END"
        ),
    }
}

/// The SQL expression rendering `template` from the row `row` (`r.`, `OLD.`, `NEW.`).
fn template_expr(entity: &EntityMeta, template: &Template, row: &str) -> String {
    let parts: Vec<String> = template
        .segments()
        .iter()
        .map(|segment| match segment {
            Segment::Lit(text) => literal(text),
            Segment::Placeholder(field) => match entity.column(field) {
                Some(column) => render_expr(column.kind, &format!("{row}{}", ident(column.column))),
                // The derive guarantees every placeholder names a field; render NULL if it ever did not.
                None => literal(NULL_RENDERING),
            },
        })
        .collect();
    if parts.is_empty() {
        literal("")
    } else {
        parts.join(" || ")
    }
}

/// The projection of the columns `template` reads, for deduplication: text columns compared byte for byte
/// (`COLLATE "C"`, as the keys they render); `1 AS one` for a template without placeholders (one key
/// whenever a row changed).
fn template_columns(entity: &EntityMeta, template: &Template) -> String {
    let mut out: Vec<String> = Vec::new();
    for field in template.placeholders() {
        if let Some(column) = entity.column(field) {
            let quoted = ident(column.column);
            let projected = match column.kind {
                PartKind::Text => format!("({quoted})::text COLLATE \"C\" AS {quoted}"),
                PartKind::Int | PartKind::Bool => quoted,
            };
            if !out.contains(&projected) {
                out.push(projected);
            }
        }
    }
    if out.is_empty() {
        "1 AS one".to_owned()
    } else {
        out.join(", ")
    }
}

fn kind_types(kind: PartKind) -> &'static str {
    match kind {
        PartKind::Int => "smallint, integer or bigint",
        PartKind::Bool => "boolean",
        PartKind::Text => "text, varchar, uuid or name (with a deterministic collation)",
    }
}

/// `<schema>.<prefix>_<hash of the table>`: stable, short, collision-free in practice.
pub(super) fn function_name(prefix: &str, table: &str) -> String {
    format!("{SCHEMA}.{prefix}_{:016x}", fnv1a64(table.as_bytes()))
}

/// A table name as written in the entity (`products` or `shop.products`), quoted.
pub(crate) fn qualified(table: &str) -> String {
    match table.split_once('.') {
        Some((schema, name)) => format!("{}.{}", ident(schema), ident(name)),
        None => ident(table),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(qualified("shop.products"), "\"shop\".\"products\"");
    }
}
