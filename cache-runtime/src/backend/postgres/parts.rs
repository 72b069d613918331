//! What each installer (a build, named by its registry's fingerprint) records of its entities per table,
//! so that installs are additive: a table's capture renders the templates of every build that installed
//! it (two services sharing a table, or two builds during a rolling deploy, each keep their keys
//! invalidated), and an install never touches the tables of other registries.
//!
//! A record is text, one line per item, every value escaped by the key rendering rule (so no value can
//! contain a separator): `entity <type> <table> <ttl ms>`, then the entity's `template <text>` lines (key
//! first) and `column <field> <column> <kind>` lines.

use sqlx::PgConnection;

use super::records::{decode, merge};
use super::schema::drop_table_sql;
use super::{PgSchema, function};
use crate::backend::all_or_nothing;
use crate::entity::EntityMeta;
use crate::error::Error;

impl PgSchema<'_> {
    /// Whether builds' records exist yet (not before the first install of this schema version).
    pub(super) async fn parts_installed(conn: &mut PgConnection) -> Result<bool, Error> {
        Ok(sqlx::query_scalar(concat!(
            "SELECT to_regclass('",
            function!("capture_parts"),
            "') IS NOT NULL"
        ))
        .fetch_one(&mut *conn)
        .await?)
    }

    /// The entities other builds recorded for this registry's tables.
    pub(super) async fn others(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Vec<&'static EntityMeta>, Error> {
        let tables: Vec<&str> = self.tables().iter().map(|e| e.table).collect();
        let records: Vec<(String, String, String)> = sqlx::query_as(concat!(
            "SELECT tbl, installer, entities FROM ",
            function!("capture_parts"),
            " WHERE tbl = ANY($1) AND installer <> $2 ORDER BY tbl, installer"
        ))
        .bind(&tables)
        .bind(self.registry().fingerprint())
        .fetch_all(&mut *conn)
        .await?;
        let mut out = Vec::new();
        for (table, installer, record) in records {
            out.extend(decode(&record).map_err(|problem| {
                Error::CaptureBroken(vec![format!(
                    "the capture build {installer} recorded for table {table} cannot be read ({problem}); \
                     retire it with PgSchema::retire"
                )])
            })?);
        }
        Ok(out)
    }

    /// Checks that every table of this registry is captured with its templates: recorded by this build, or
    /// identically by another.
    pub(super) async fn check_parts(&self, conn: &mut PgConnection) -> Result<(), Error> {
        let tables: Vec<&str> = self.tables().iter().map(|e| e.table).collect();
        if tables.is_empty() {
            return Ok(());
        }
        let parts: Vec<(String, String, String)> = sqlx::query_as(concat!(
            "SELECT tbl, installer, fingerprint FROM ",
            function!("capture_parts"),
            " WHERE tbl = ANY($1) ORDER BY installed_at DESC"
        ))
        .bind(&tables)
        .fetch_all(&mut *conn)
        .await?;
        let own = self.registry().fingerprint();
        let missing: Vec<&str> = tables
            .iter()
            .copied()
            .filter(|t| {
                let expected = self.table_fingerprint(t);
                !parts.iter().any(|(tbl, _, fp)| tbl == t && fp == &expected)
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        // Another build captures (some of) these tables: the most recent install names it.
        match parts.iter().find(|(_, installer, _)| installer != &own) {
            Some((_, installer, _)) => Err(Error::FingerprintMismatch {
                installed: installer.clone(),
                expected: own,
            }),
            None => Err(Error::NotInstalled { expected: own }),
        }
    }

    /// Removes what the build `installer` (a registry fingerprint, as in
    /// [`Error::FingerprintMismatch`]) recorded, e.g. once every process of an old build is gone after a
    /// rolling deploy: each of its tables is captured again with the templates of the builds that remain,
    /// or loses its capture when none remains. In one transaction, under the install lock.
    ///
    /// # Errors
    ///
    /// [`Error::Database`]; nothing is changed then.
    ///
    /// # Cancel safety
    ///
    /// All or nothing: one transaction.
    pub async fn retire(&self, conn: &mut PgConnection, installer: &str) -> Result<(), Error> {
        use sqlx::Connection as _;
        all_or_nothing(conn.begin().await?, async |tx: &mut PgConnection| {
            let lock = super::schema::install_lock_sql();
            sqlx::query(sqlx::AssertSqlSafe(lock))
                .execute(&mut *tx)
                .await?;
            self.retire_in(tx, installer).await
        })
        .await?;
        tracing::info!(installer, "retired a build's cache invalidation capture");
        Ok(())
    }

    /// Retires (in the install's transaction) the builds unseen for longer than the retention.
    pub(super) async fn retire_unseen(&self, tx: &mut PgConnection) -> Result<(), Error> {
        let unseen: Vec<String> = sqlx::query_scalar(concat!(
            "SELECT DISTINCT installer FROM ",
            function!("capture_parts"),
            " WHERE installer <> $1 AND last_seen < now() - $2::interval"
        ))
        .bind(self.registry().fingerprint())
        .bind(self.unseen_interval())
        .fetch_all(&mut *tx)
        .await?;
        for installer in unseen {
            tracing::info!(%installer, "retiring a build no process has run for a long time");
            self.retire_in(tx, &installer).await?;
        }
        Ok(())
    }

    /// Removes the records of `installer` and captures its tables again from the remaining builds.
    async fn retire_in(&self, tx: &mut PgConnection, installer: &str) -> Result<(), Error> {
        let tables: Vec<String> = sqlx::query_scalar(concat!(
            "DELETE FROM ",
            function!("capture_parts"),
            " WHERE installer = $1 RETURNING tbl"
        ))
        .bind(installer)
        .fetch_all(&mut *tx)
        .await?;
        for table in tables {
            let records: Vec<String> = sqlx::query_scalar(concat!(
                "SELECT entities FROM ",
                function!("capture_parts"),
                " WHERE tbl = $1"
            ))
            .bind(&table)
            .fetch_all(&mut *tx)
            .await?;
            let mut entities = Vec::new();
            for record in records {
                entities.extend(decode(&record).map_err(|p| Error::CaptureBroken(vec![p]))?);
            }
            let mut sql = concat!(
                "SELECT set_config('",
                function!("repairing"),
                "', 'on', true);\n"
            )
            .to_owned();
            sql.push_str(&drop_table_sql(&table));
            if let Some(merged) = merge(&entities) {
                sql.push_str(&self.table_sql(merged));
            }
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }
}
