-- DDL on registered tables, while applications run: an event trigger per kind of change, installed when the
-- installing role is a superuser (event triggers need one; otherwise each pool's connect check remains).
--
-- - ALTER TABLE / CREATE TABLE on a registered table or one of its partitions or children: capture that is
--   missing (a table created under a registered name, a table renamed to one, a partition attached or
--   created) is installed; a trigger switched to ENABLE (not ALWAYS/REPLICA) is switched back; a disabled
--   one refuses the statement. The table's namespaces are invalidated (rows may have come or gone: ATTACH,
--   DETACH, a new table under the name).
-- - A rewrite of a registered table (ALTER COLUMN … TYPE … USING): its namespaces are invalidated.
-- - DROP TABLE of a registered table: its namespaces are invalidated.
CREATE TABLE IF NOT EXISTS @schema@.captured (
  tbl text PRIMARY KEY,
  schema_name text NOT NULL,
  table_name text NOT NULL,
  every_ddl text NOT NULL,
  row_ddl text,
  shapes text[] NOT NULL,
  -- The name resolved at install time: the functions below run with a pinned search_path.
  qualified text GENERATED ALWAYS AS (quote_ident(schema_name) || '.' || quote_ident(table_name)) STORED
);
REVOKE ALL ON @schema@.captured FROM PUBLIC;

-- What each build (registry fingerprint) recorded of its entities per table: a table's capture renders the
-- templates of all of them (see the Rust module `parts`).
CREATE TABLE IF NOT EXISTS @schema@.capture_parts (
  tbl text NOT NULL,
  installer text NOT NULL,
  fingerprint text NOT NULL,
  entities text NOT NULL,
  installed_at timestamptz NOT NULL,
  -- Refreshed by the running processes of the build (`alive`): an install retires builds unseen for long.
  last_seen timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tbl, installer)
);
GRANT SELECT ON @schema@.capture_parts TO PUBLIC;

-- A process of build `installer` runs (called about once a minute; writes at most once a minute).
CREATE OR REPLACE FUNCTION @schema@.alive(installer text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  UPDATE @schema@.capture_parts p SET last_seen = now()
  WHERE p.installer = alive.installer AND p.last_seen < now() - interval '1 minute'
$fn$;

-- Writes the namespaces `shapes` to the outbox (as an unwrapped session: every relay is notified).
CREATE OR REPLACE FUNCTION @schema@.invalidate_namespaces(shapes text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
  INSERT INTO @schema@.outbox (txid, pid, keys, created_at)
  VALUES (pg_current_xact_id(), pg_backend_pid(), shapes, clock_timestamp());
  IF current_setting('max_prepared_transactions') = '0' THEN
    PERFORM pg_notify('@channel@', '');
  END IF;
END
$fn$;
REVOKE ALL ON FUNCTION @schema@.invalidate_namespaces(text[]) FROM PUBLIC;

-- A registered table and its partitions and inheritance children.
CREATE OR REPLACE FUNCTION @schema@.tree(root regclass) RETURNS TABLE (rel regclass, relispartition boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
  WITH RECURSIVE tree(relid) AS (
    SELECT root::oid
    UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.relid)
  SELECT tree.relid::regclass, c.relispartition FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.relid
$fn$;

-- Creates the capture triggers recorded for `tbl` on it and on each of its partitions and children that
-- lack them (row triggers not on partitions: PostgreSQL clones those of a partitioned table).
CREATE OR REPLACE FUNCTION @schema@.install_triggers(tbl text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  cap record;
  t record;
BEGIN
  SELECT * INTO cap FROM @schema@.captured c WHERE c.tbl = install_triggers.tbl;
  FOR t IN SELECT r.rel, r.relispartition FROM @schema@.tree(to_regclass(cap.qualified)) r
           WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger tg
                             WHERE tg.tgrelid = r.rel AND tg.tgname = 'cache_invalidation_truncate') LOOP
    EXECUTE replace(cap.every_ddl, '@rel@', t.rel::text);
    IF cap.row_ddl IS NOT NULL AND NOT t.relispartition THEN
      EXECUTE replace(cap.row_ddl, '@rel@', t.rel::text);
    END IF;
  END LOOP;
END
$fn$;
REVOKE ALL ON FUNCTION @schema@.install_triggers(text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION @schema@.on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  cap record;
  root regclass;
  t record;
BEGIN
  IF current_setting('@schema@.repairing', true) = 'on' THEN
    RETURN;
  END IF;
  FOR cap IN SELECT * FROM @schema@.captured LOOP
    root := to_regclass(cap.qualified);
    CONTINUE WHEN root IS NULL OR NOT EXISTS (
      SELECT 1 FROM pg_event_trigger_ddl_commands() d JOIN @schema@.tree(root) r ON r.rel = d.objid
      WHERE d.classid = 'pg_catalog.pg_class'::regclass);
    PERFORM set_config('@schema@.repairing', 'on', true);
    FOR t IN SELECT r.rel, r.relispartition, tg.tgname, tg.tgenabled
             FROM @schema@.tree(root) r
             LEFT JOIN pg_catalog.pg_trigger tg ON tg.tgrelid = r.rel AND tg.tgname LIKE 'cache\_invalidation\_%'
                                                 AND NOT tg.tgisinternal LOOP
      IF t.tgenabled = 'D' THEN
        RAISE EXCEPTION 'cache invalidation: trigger % on % is disabled, so writes to % would leave cached values stale', t.tgname, t.rel, t.rel
          USING HINT = 'Keep capture enabled: it fires in replica mode too (ENABLE ALWAYS), so restores and migrations need no DISABLE TRIGGER (pg_restore: leave out --disable-triggers).';
      ELSIF t.tgenabled = 'O' THEN
        EXECUTE format('ALTER TABLE %s ENABLE %s TRIGGER %I', t.rel,
                       CASE WHEN t.tgname = 'cache_invalidation_replica' THEN 'REPLICA' ELSE 'ALWAYS' END, t.tgname);
      END IF;
    END LOOP;
    PERFORM @schema@.install_triggers(cap.tbl);
    PERFORM set_config('@schema@.repairing', 'off', true);
    PERFORM @schema@.invalidate_namespaces(cap.shapes);
  END LOOP;
END
$fn$;

-- A registered table rewritten (table_rewrite) or dropped (sql_drop): its rows changed without DML.
CREATE OR REPLACE FUNCTION @schema@.on_rewrite_or_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  cap record;
BEGIN
  FOR cap IN SELECT c.* FROM @schema@.captured c
             WHERE CASE WHEN TG_EVENT = 'table_rewrite' THEN to_regclass(c.qualified) IS NOT NULL AND EXISTS (
                          SELECT 1 FROM @schema@.tree(to_regclass(c.qualified)) r
                          WHERE r.rel = pg_event_trigger_table_rewrite_oid())
                        ELSE EXISTS (
                          SELECT 1 FROM pg_event_trigger_dropped_objects() d
                          WHERE d.object_type = 'table' AND d.schema_name = c.schema_name
                            AND d.object_name = c.table_name) END LOOP
    PERFORM @schema@.invalidate_namespaces(cap.shapes);
  END LOOP;
END
$fn$;

DO $events$
BEGIN
  IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
    RAISE WARNING 'cache invalidation: % is not a superuser, so no event trigger guards DDL on registered tables (a pool refuses to connect when capture is broken; a running application does not notice until then)', current_user;
    RETURN;
  END IF;
  DROP EVENT TRIGGER IF EXISTS cache_invalidation_ddl;
  DROP EVENT TRIGGER IF EXISTS cache_invalidation_rewrite;
  DROP EVENT TRIGGER IF EXISTS cache_invalidation_drop;
  CREATE EVENT TRIGGER cache_invalidation_ddl ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
    EXECUTE FUNCTION @schema@.on_ddl();
  CREATE EVENT TRIGGER cache_invalidation_rewrite ON table_rewrite EXECUTE FUNCTION @schema@.on_rewrite_or_drop();
  CREATE EVENT TRIGGER cache_invalidation_drop ON sql_drop WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
    EXECUTE FUNCTION @schema@.on_rewrite_or_drop();
  ALTER EVENT TRIGGER cache_invalidation_ddl ENABLE ALWAYS;
  ALTER EVENT TRIGGER cache_invalidation_rewrite ENABLE ALWAYS;
  ALTER EVENT TRIGGER cache_invalidation_drop ENABLE ALWAYS;
END
$events$;
