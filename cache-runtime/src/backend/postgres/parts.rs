//! What each installer (a build, named by its registry's fingerprint) records of its entities per table,
//! so that installs are additive: a table's capture renders the templates of every build that installed
//! it (two services sharing a table, or two builds during a rolling deploy, each keep their keys
//! invalidated), and an install never touches the tables of other registries.
//!
//! A record is text, one line per item, every value escaped by the key rendering rule (so no value can
//! contain a separator): `entity <type> <table> <ttl ms>`, then the entity's `template <text>` lines (key
//! first) and `column <field> <column> <kind>` lines.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::PgConnection;

use super::schema::drop_table_sql;
use super::{PgSchema, function};
use crate::backend::all_or_nothing;
use crate::entity::{Column, EntityMeta};
use crate::error::Error;
use crate::key::{PartKind, Segment, Template};

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

/// The record of `entities` (all of one table).
pub(super) fn encode(entities: &[&EntityMeta]) -> String {
    let mut out = String::new();
    let mut line = |fields: &[&str]| {
        let escaped: Vec<String> = fields
            .iter()
            .map(|f| {
                let mut s = String::new();
                cache_template::escape_into(&mut s, f);
                s
            })
            .collect();
        out.push_str(&escaped.join(" "));
        out.push('\n');
    };
    for entity in entities {
        let ttl = entity.ttl.as_millis().to_string();
        line(&["entity", entity.type_name, entity.table, &ttl]);
        for template in entity.templates() {
            line(&["template", template.text()]);
        }
        for column in entity.columns {
            line(&["column", column.field, column.column, column.kind.name()]);
        }
    }
    out
}

/// The entities of a record, as static metadata (leaked: an install decodes a handful of records).
///
/// # Errors
///
/// A description of the first malformed line.
pub(super) fn decode(record: &str) -> Result<Vec<&'static EntityMeta>, String> {
    let mut entities: Vec<(Vec<String>, Vec<&'static Template>, Vec<Column>)> = Vec::new();
    for line in record.lines() {
        let fields: Vec<String> = line
            .split(' ')
            .map(|f| {
                cache_template::unescape(f)
                    .flatten()
                    .ok_or_else(|| format!("bad field {f:?}"))
            })
            .collect::<Result<_, _>>()?;
        match (fields.first().map(String::as_str), entities.last_mut()) {
            (Some("entity"), _) if fields.len() == 4 => {
                entities.push((fields, Vec::new(), Vec::new()));
            }
            (Some("template"), Some(entity)) if fields.len() == 2 => {
                entity.1.push(template(&fields[1])?);
            }
            (Some("column"), Some(entity)) if fields.len() == 4 => entity.2.push(Column {
                field: leak(&fields[1]),
                column: leak(&fields[2]),
                kind: PartKind::from_name(&fields[3])
                    .ok_or_else(|| format!("bad kind {:?}", fields[3]))?,
            }),
            _ => return Err(format!("bad line {line:?}")),
        }
    }
    entities
        .into_iter()
        .map(|(head, templates, columns)| {
            let (key, depends) = templates
                .split_first()
                .ok_or_else(|| format!("entity {} without a key", head[1]))?;
            let ttl = head[3]
                .parse()
                .map_err(|_| format!("bad ttl {:?}", head[3]))?;
            Ok(&*Box::leak(Box::new(EntityMeta {
                type_name: leak(&head[1]),
                table: leak(&head[2]),
                key,
                depends: Box::leak(depends.to_vec().into_boxed_slice()),
                ttl: Duration::from_millis(ttl),
                columns: Box::leak(columns.into_boxed_slice()),
            })))
        })
        .collect()
}

/// One entity standing for every entity of `table` in `entities`: their templates, with placeholders
/// named after the columns they read (different builds may name a column's field differently), each
/// rendering once.
pub(super) fn merge(entities: &[&'static EntityMeta]) -> Option<&'static EntityMeta> {
    let first = entities.first()?;
    let mut columns: BTreeMap<&'static str, PartKind> = BTreeMap::new();
    let mut templates: Vec<&'static Template> = Vec::new();
    for entity in entities {
        for template in entity.templates() {
            let renamed = by_column(entity, template);
            if !templates.iter().any(|t| t.text() == renamed.text()) {
                templates.push(renamed);
            }
        }
        for column in entity.columns {
            columns.entry(column.column).or_insert(column.kind);
        }
    }
    let (key, depends) = templates.split_first()?;
    let columns: Vec<Column> = columns
        .into_iter()
        .map(|(column, kind)| Column {
            field: column,
            column,
            kind,
        })
        .collect();
    Some(Box::leak(Box::new(EntityMeta {
        type_name: first.type_name,
        table: first.table,
        key,
        depends: Box::leak(depends.to_vec().into_boxed_slice()),
        ttl: first.ttl,
        columns: Box::leak(columns.into_boxed_slice()),
    })))
}

/// `template` with each placeholder named after the column it reads.
fn by_column(entity: &EntityMeta, template: &Template) -> &'static Template {
    let text: String = template
        .segments()
        .iter()
        .map(|s| match s {
            Segment::Lit(text) => (*text).to_owned(),
            Segment::Placeholder(field) => {
                format!("<{}>", entity.column(field).map_or(*field, |c| c.column))
            }
        })
        .collect();
    let segments: Vec<Segment> = template
        .segments()
        .iter()
        .map(|s| match s {
            Segment::Lit(text) => Segment::Lit(text),
            Segment::Placeholder(field) => {
                Segment::Placeholder(entity.column(field).map_or(*field, |c| c.column))
            }
        })
        .collect();
    Box::leak(Box::new(Template::__new(
        leak(&text),
        template.shape(),
        Box::leak(segments.into_boxed_slice()),
    )))
}

/// A template parsed from its text (a record holds texts that a derive accepted).
fn template(text: &str) -> Result<&'static Template, String> {
    let parsed = cache_template::parse(text).map_err(|e| e.join("; "))?;
    let shape = leak(&parsed.shape());
    let segments: Vec<Segment> = parsed
        .segments
        .iter()
        .map(|s| match s {
            cache_template::Segment::Lit(text) => Segment::Lit(leak(text)),
            cache_template::Segment::Placeholder(name) => Segment::Placeholder(leak(name)),
        })
        .collect();
    Ok(Box::leak(Box::new(Template::__new(
        leak(text),
        shape,
        Box::leak(segments.into_boxed_slice()),
    ))))
}

fn leak(text: &str) -> &'static str {
    Box::leak(text.to_owned().into_boxed_str())
}
