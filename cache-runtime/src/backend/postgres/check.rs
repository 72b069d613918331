//! What a pool checks at connect beyond the fingerprint: that capture is in place on every registered
//! table and on each of its partitions and inheritance children (each trigger present, `ENABLE ALWAYS`,
//! calling this install's function), and that the connecting role may use the outbox.

use sqlx::PgConnection;

use super::schema::{CLIENT_FUNCTIONS, function_name, qualified, trigger_names};
use super::{PgSchema, SCHEMA};
use crate::backend::{TriggerMode, literal};
use crate::error::Error;

impl PgSchema<'_> {
    /// Every capture problem: a registered table that is missing, or a table, partition or child whose
    /// trigger is missing, disabled or calls another function.
    pub(super) async fn check_triggers(&self, conn: &mut PgConnection) -> Result<(), Error> {
        let Some(query) = self.triggers_query() else {
            return Ok(());
        };
        let problems: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(query))
            .fetch_all(&mut *conn)
            .await?;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::CaptureBroken(problems))
        }
    }

    /// A query returning one sentence per problem, or `None` without entities.
    ///
    /// A table's mode is the one its last install chose (builds sharing a database may differ): row mode
    /// where the table has the row trigger, statement mode otherwise.
    fn triggers_query(&self) -> Option<String> {
        let mut expected = Vec::new();
        for entity in self.tables() {
            let root = literal(&qualified(entity.table));
            for mode in [TriggerMode::Statement, TriggerMode::Row] {
                for (trigger, prefix, enabled) in trigger_names(mode) {
                    let function = literal(&format!("{}()", function_name(prefix, entity.table)));
                    expected.push(format!(
                        "({root}, {}, {}, {function}, {})",
                        literal(mode.as_str()),
                        literal(trigger),
                        literal(enabled)
                    ));
                }
            }
        }
        if expected.is_empty() {
            return None;
        }
        Some(format!(
            "WITH RECURSIVE candidates(root, mode, tgname, fn, enabled) AS (VALUES {}),
             expected AS (
               SELECT c.root, c.tgname, c.fn, c.enabled FROM candidates c
               WHERE c.mode = CASE WHEN EXISTS (
                         SELECT 1 FROM pg_catalog.pg_trigger t
                         WHERE t.tgrelid = to_regclass(c.root) AND t.tgname = 'cache_invalidation_row')
                       THEN 'row' ELSE 'statement' END),
             tree(root, relid) AS (
               SELECT DISTINCT e.root, to_regclass(e.root)::oid FROM expected e WHERE to_regclass(e.root) IS NOT NULL
               UNION SELECT tree.root, i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.relid)
             SELECT format('table %s does not exist', e.root) FROM (SELECT DISTINCT root FROM expected) e
               WHERE to_regclass(e.root) IS NULL
             UNION ALL
             SELECT CASE WHEN t.oid IS NULL THEN format('%s has no trigger %s', tree.relid::regclass, e.tgname)
                         WHEN t.tgenabled = 'D' THEN format('trigger %s on %s is disabled', e.tgname, tree.relid::regclass)
                         WHEN t.tgenabled::text <> e.enabled AND e.enabled = 'A' THEN format(
                           'trigger %s on %s is not ENABLE ALWAYS (it would not fire with session_replication_role = replica)',
                           e.tgname, tree.relid::regclass)
                         WHEN t.tgenabled::text <> e.enabled THEN format(
                           'trigger %s on %s is not ENABLE REPLICA (logical-replication apply would not be captured)',
                           e.tgname, tree.relid::regclass)
                         ELSE format('trigger %s on %s calls %s instead of %s', e.tgname, tree.relid::regclass,
                                     t.tgfoid::regprocedure, e.fn) END
             FROM tree JOIN expected e ON e.root = tree.root
             LEFT JOIN pg_catalog.pg_trigger t ON t.tgrelid = tree.relid AND t.tgname = e.tgname
             WHERE t.oid IS NULL OR t.tgenabled::text <> e.enabled OR t.tgfoid IS DISTINCT FROM to_regprocedure(e.fn)
             ORDER BY 1",
            expected.join(", ")
        ))
    }

    /// The connecting role's rights on the outbox: `USAGE` on the schema and `EXECUTE` on every function a
    /// client calls. Also warns when the server allows prepared transactions (the triggers then do not
    /// `NOTIFY`).
    pub(super) async fn check_grants(conn: &mut PgConnection) -> Result<(), Error> {
        let functions: Vec<String> = CLIENT_FUNCTIONS.iter().map(|f| (*f).to_owned()).collect();
        let (role, prepared, missing): (String, String, Vec<String>) = sqlx::query_as(
            "SELECT current_user::text, current_setting('max_prepared_transactions'), array(
               SELECT 'USAGE on schema ' || $1 WHERE NOT has_schema_privilege($1, 'USAGE')
               UNION ALL
               SELECT 'EXECUTE on ' || f FROM unnest($2::text[]) AS f
               WHERE NOT has_schema_privilege($1, 'USAGE') OR NOT has_function_privilege(f, 'EXECUTE'))",
        )
        .bind(SCHEMA)
        .bind(&functions)
        .fetch_one(&mut *conn)
        .await?;
        if prepared != "0" {
            tracing::warn!(
                max_prepared_transactions = %prepared,
                "the server allows prepared transactions, so capture triggers do not NOTIFY (a NOTIFY would make \
                 PREPARE TRANSACTION fail): writes of other clients reach the cache at the relay's next sweep \
                 (RelayConfig::sweep_interval), not at once"
            );
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(Error::MissingGrants {
            grant: PgSchema::grant_sql(&role),
            role,
            missing,
        })
    }
}
