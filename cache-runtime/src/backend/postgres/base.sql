-- The schema, the tables and the functions that do not depend on the registry.
CREATE SCHEMA IF NOT EXISTS @schema@;
GRANT USAGE ON SCHEMA @schema@ TO PUBLIC;
CREATE TABLE IF NOT EXISTS @schema@.outbox (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  txid xid8 NOT NULL,
  pid integer NOT NULL,
  wrapped boolean NOT NULL,
  keys text[] NOT NULL,
  created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS outbox_txid ON @schema@.outbox (txid);
CREATE INDEX IF NOT EXISTS outbox_pid ON @schema@.outbox (pid, id);
REVOKE ALL ON @schema@.outbox FROM PUBLIC;
CREATE TABLE IF NOT EXISTS @schema@.installed (
  singleton boolean PRIMARY KEY CHECK (singleton),
  fingerprint text NOT NULL,
  schema_version integer NOT NULL,
  trigger_mode text NOT NULL,
  installed_at timestamptz NOT NULL
);
GRANT SELECT ON @schema@.installed TO PUBLIC;

CREATE OR REPLACE FUNCTION @schema@.escape_text(v text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$
  -- Runs of unreserved characters stay; every other run becomes the %XX of its UTF-8 bytes.
  SELECT coalesce(string_agg(
           CASE WHEN m.r[1] COLLATE "C" ~ '^[@unreserved@]' THEN m.r[1]
                ELSE upper(regexp_replace(encode(convert_to(m.r[1], 'UTF8'), 'hex'), '(..)', '%\1', 'g')) END,
           '' ORDER BY m.i), '')
  FROM regexp_matches(v COLLATE "C", '[@unreserved@]+|[^@unreserved@]+', 'g') WITH ORDINALITY AS m(r, i)
$fn$;
CREATE OR REPLACE FUNCTION @schema@.render_text(v text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$ SELECT @render_text@ $fn$;
CREATE OR REPLACE FUNCTION @schema@.render_int(v bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$ SELECT @render_int@ $fn$;
CREATE OR REPLACE FUNCTION @schema@.render_bool(v boolean) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$ SELECT @render_bool@ $fn$;

@written_keys@-- Schema version 2 installed this function, which nothing calls.
DROP FUNCTION IF EXISTS @schema@.claim(integer, interval);
CREATE OR REPLACE FUNCTION @schema@.claim_rows(max_rows integer, wrapped_grace interval, upto bigint)
RETURNS TABLE (id bigint, keys text[], age_seconds double precision)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  -- With `upto`: every row up to that id, whatever its age (the drain after a store outage). Without:
  -- rows of unwrapped sessions, and rows of wrapped sessions older than the grace period.
  SELECT o.id, o.keys, extract(epoch FROM clock_timestamp() - o.created_at)::double precision
  FROM @schema@.outbox o
  WHERE CASE WHEN upto IS NULL
             THEN NOT o.wrapped OR o.created_at < clock_timestamp() - wrapped_grace
             ELSE o.id <= upto END
  ORDER BY o.id LIMIT max_rows
  FOR UPDATE SKIP LOCKED
$fn$;
CREATE OR REPLACE FUNCTION @schema@.backlog()
RETURNS TABLE (depth bigint, max_id bigint, oldest_age_seconds double precision)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  SELECT count(*), coalesce(max(o.id), 0),
         coalesce(extract(epoch FROM clock_timestamp() - min(o.created_at))::double precision, 0)
  FROM @schema@.outbox o
$fn$;
CREATE OR REPLACE FUNCTION @schema@.max_id() RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  SELECT coalesce(max(o.id), 0) FROM @schema@.outbox o
$fn$;
CREATE OR REPLACE FUNCTION @schema@.pending_upto(upto bigint) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  SELECT count(*) FROM @schema@.outbox o WHERE o.id <= upto
$fn$;
CREATE OR REPLACE FUNCTION @schema@.delivered(ids bigint[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
  -- Losing this delete in a crash only means a second (harmless) delivery: do not wait for the WAL flush.
  PERFORM set_config('synchronous_commit', 'off', true);
  DELETE FROM @schema@.outbox WHERE id = ANY (ids);
END
$fn$;
