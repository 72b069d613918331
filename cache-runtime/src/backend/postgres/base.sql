-- The schema, the tables and the functions that do not depend on the registry.
CREATE SCHEMA IF NOT EXISTS @schema@;
GRANT USAGE ON SCHEMA @schema@ TO PUBLIC;
CREATE TABLE IF NOT EXISTS @schema@.outbox (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  txid xid8 NOT NULL,
  pid integer NOT NULL,
  -- The consumer tag of the wrapped session that wrote the row (it delivers the row itself); NULL for others.
  writer text,
  -- The consumers (tags) that delivered the row: it is deleted once every live consumer has.
  delivered_to text[] NOT NULL DEFAULT '{}',
  keys text[] NOT NULL,
  created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- From schema version 3 (`wrapped boolean` instead of `writer`; capture functions of version 3 still in
-- place write `wrapped`, and their rows count as other clients': delivered at once).
ALTER TABLE @schema@.outbox ADD COLUMN IF NOT EXISTS writer text;
ALTER TABLE @schema@.outbox ADD COLUMN IF NOT EXISTS delivered_to text[] NOT NULL DEFAULT '{}';
DO $up$ BEGIN
  IF EXISTS (SELECT FROM pg_catalog.pg_attribute WHERE attrelid = '@schema@.outbox'::regclass
             AND attname = 'wrapped' AND NOT attisdropped) THEN
    ALTER TABLE @schema@.outbox ALTER COLUMN wrapped SET DEFAULT false;
  END IF;
END $up$;
CREATE INDEX IF NOT EXISTS outbox_txid ON @schema@.outbox (txid);
CREATE INDEX IF NOT EXISTS outbox_pid ON @schema@.outbox (pid, id);
REVOKE ALL ON @schema@.outbox FROM PUBLIC;
-- The stores the outbox is delivered to, by tag (a hash of the name): every live consumer receives every
-- row. A consumer is live while one of its processes (pools, relays) is: registered (`register`, every
-- heartbeat) less than `expires_after` ago and not closed (`unregister`). `missed`: rows were deleted while
-- the consumer was not live; its store must drop what it holds of the registered tables when it returns.
CREATE TABLE IF NOT EXISTS @schema@.consumers (
  tag text PRIMARY KEY,
  name text NOT NULL,
  expires_after interval NOT NULL,
  missed boolean NOT NULL DEFAULT false,
  -- The highest store sequence of a delivery no longer in `replay` (purged, or recorded by schema version
  -- 5): a store that forgot invalidations back below it cannot be repaired by a replay.
  store_sequence bigint NOT NULL DEFAULT 0
);
ALTER TABLE @schema@.consumers ADD COLUMN IF NOT EXISTS store_sequence bigint NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS consumers_not_missed ON @schema@.consumers (tag) WHERE NOT missed;
REVOKE ALL ON @schema@.consumers FROM PUBLIC;
-- The replay window: the keys of each delivery of a consumer's rows, with the store's sequence after it, kept
-- for a while after the rows are deleted. A store found to have forgotten invalidations back to sequence S
-- (restarted from an older snapshot, a replica promoted) is sent again the keys of every delivery above S;
-- `store_sequence` of `consumers` says whether the window still reaches back that far.
CREATE TABLE IF NOT EXISTS @schema@.replay (
  consumer text NOT NULL,
  sequence bigint NOT NULL,
  keys text[] NOT NULL,
  delivered_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS replay_sequence ON @schema@.replay (consumer, sequence);
CREATE INDEX IF NOT EXISTS replay_delivered_at ON @schema@.replay (consumer, delivered_at);
REVOKE ALL ON @schema@.replay FROM PUBLIC;
CREATE TABLE IF NOT EXISTS @schema@.consumer_processes (
  tag text NOT NULL REFERENCES @schema@.consumers ON DELETE CASCADE,
  process text NOT NULL,
  last_seen timestamptz NOT NULL DEFAULT now(),
  -- Closed by `unregister`: a registration that reaches the server later (a heartbeat in flight at close)
  -- does not bring it back.
  closed boolean NOT NULL DEFAULT false,
  PRIMARY KEY (tag, process)
);
ALTER TABLE @schema@.consumer_processes ADD COLUMN IF NOT EXISTS closed boolean NOT NULL DEFAULT false;
REVOKE ALL ON @schema@.consumer_processes FROM PUBLIC;
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

@written_keys@-- Schema version 2 installed this function, which nothing calls; version 3 those without a consumer.
DROP FUNCTION IF EXISTS @schema@.claim(integer, interval);
DROP FUNCTION IF EXISTS @schema@.claim_rows(integer, interval, bigint);
DROP FUNCTION IF EXISTS @schema@.backlog();
DROP FUNCTION IF EXISTS @schema@.pending_upto(bigint);
DROP FUNCTION IF EXISTS @schema@.delivered(bigint[]);
DROP FUNCTION IF EXISTS @schema@.delivered(bigint[], text, boolean);
CREATE OR REPLACE FUNCTION @schema@.live_consumers() RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
  SELECT coalesce(array_agg(DISTINCT c.tag), '{}')
  FROM @schema@.consumers c JOIN @schema@.consumer_processes p ON p.tag = c.tag
  WHERE p.last_seen > now() - c.expires_after AND NOT p.closed
$fn$;
-- Deletes the rows `ids` (all of them with `every`, else those every live consumer delivered); consumers
-- that are not live missed them.
CREATE OR REPLACE FUNCTION @schema@.forget(ids bigint[], live text[], every boolean) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
  IF ids IS NULL THEN
    DELETE FROM @schema@.outbox o WHERE cardinality(o.delivered_to) > 0 AND live <@ o.delivered_to;
  ELSIF every THEN
    DELETE FROM @schema@.outbox o WHERE o.id = ANY (ids);
  ELSE
    DELETE FROM @schema@.outbox o WHERE o.id = ANY (ids) AND live <@ o.delivered_to;
  END IF;
  IF FOUND THEN
    UPDATE @schema@.consumers c SET missed = true WHERE NOT c.missed AND NOT c.tag = ANY (live);
  END IF;
END
$fn$;
REVOKE ALL ON FUNCTION @schema@.live_consumers() FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema@.forget(bigint[], text[], boolean) FROM PUBLIC;
-- Registers (or refreshes) a process of a consumer; true when the consumer missed rows (see `consumers`):
-- its store must drop what it holds of the registered tables.
CREATE OR REPLACE FUNCTION @schema@.register(consumer text, consumer_name text, expiry interval,
                                             process_id text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  lost boolean;
BEGIN
  INSERT INTO @schema@.consumers AS c (tag, name, expires_after) VALUES (consumer, consumer_name, expiry)
  ON CONFLICT ON CONSTRAINT consumers_pkey DO UPDATE SET name = EXCLUDED.name, expires_after = EXCLUDED.expires_after
  RETURNING c.missed INTO lost;
  INSERT INTO @schema@.consumer_processes AS p (tag, process) VALUES (consumer, process_id)
  ON CONFLICT ON CONSTRAINT consumer_processes_pkey DO UPDATE SET last_seen = now() WHERE NOT p.closed;
  IF lost THEN
    UPDATE @schema@.consumers c SET missed = false WHERE c.tag = consumer;
  END IF;
  -- Processes gone for a day.
  DELETE FROM @schema@.consumer_processes p WHERE p.last_seen < now() - interval '1 day';
  RETURN lost;
END
$fn$;
-- Deletes the rows every live consumer delivered while another expired (nobody else deletes them). A
-- statement of its own, after `register`: like `delivered`, it locks outbox rows before consumer rows, and
-- `register` locks no outbox row, so the three cannot deadlock.
CREATE OR REPLACE FUNCTION @schema@.prune() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
  PERFORM set_config('synchronous_commit', 'off', true);
  PERFORM @schema@.forget(NULL, @schema@.live_consumers(), false);
END
$fn$;
-- A process of a consumer closed: the consumer is live while another of its processes is.
CREATE OR REPLACE FUNCTION @schema@.unregister(consumer text, process text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  INSERT INTO @schema@.consumer_processes AS p (tag, process, closed) VALUES (consumer, unregister.process, true)
  ON CONFLICT ON CONSTRAINT consumer_processes_pkey DO UPDATE SET closed = true
$fn$;
CREATE OR REPLACE FUNCTION @schema@.claim_rows(max_rows integer, wrapped_grace interval, upto bigint, consumer text)
RETURNS TABLE (id bigint, keys text[], age_seconds double precision)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  -- Rows this consumer has not delivered. With `upto`: every such row up to that id, whatever its age (the
  -- drain after a store outage). Without: rows of other writers, and this consumer's wrapped writers' rows
  -- older than the grace period. A row held by another relay's batch is skipped; when that batch leaves
  -- the row to other consumers, its `delivered` notifies the relays again.
  SELECT o.id, o.keys, extract(epoch FROM clock_timestamp() - o.created_at)::double precision
  FROM @schema@.outbox o
  WHERE NOT consumer = ANY (o.delivered_to)
    AND CASE WHEN upto IS NULL
             THEN o.writer IS DISTINCT FROM consumer OR o.created_at < clock_timestamp() - wrapped_grace
             ELSE o.id <= upto END
  ORDER BY o.id LIMIT max_rows
  FOR UPDATE SKIP LOCKED
$fn$;
CREATE OR REPLACE FUNCTION @schema@.backlog(consumer text)
RETURNS TABLE (depth bigint, max_id bigint, oldest_age_seconds double precision, total bigint,
               consumers integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  SELECT count(*) FILTER (WHERE NOT consumer = ANY (o.delivered_to)), coalesce(max(o.id), 0),
         coalesce(extract(epoch FROM clock_timestamp()
                  - min(o.created_at) FILTER (WHERE NOT consumer = ANY (o.delivered_to)))::double precision, 0),
         count(*), cardinality(@schema@.live_consumers())
  FROM @schema@.outbox o
$fn$;
CREATE OR REPLACE FUNCTION @schema@.max_id() RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  SELECT coalesce(max(o.id), 0) FROM @schema@.outbox o
$fn$;
CREATE OR REPLACE FUNCTION @schema@.pending_upto(upto bigint, consumer text) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  SELECT count(*) FROM @schema@.outbox o WHERE o.id <= upto AND NOT consumer = ANY (o.delivered_to)
$fn$;
-- `consumer` delivered the rows `ids` when its store's sequence was `store_sequence` (recorded, after the
-- rows: outbox rows are locked before consumer rows): deleted when no other consumer is live, else marked
-- (and deleted once every live consumer has). Rows left to other consumers notify the relays (a wrapped
-- writer's rows send no NOTIFY of their own, and a relay may have skipped rows this batch held).
CREATE OR REPLACE FUNCTION @schema@.delivered(ids bigint[], consumer text, store_sequence bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  live text[] := @schema@.live_consumers();
BEGIN
  -- Losing this delete in a crash only means a second (harmless) delivery: do not wait for the WAL flush.
  PERFORM set_config('synchronous_commit', 'off', true);
  -- The rows' keys enter the replay window before the rows go (one row per delivery).
  IF delivered.store_sequence > 0 THEN
    INSERT INTO @schema@.replay (consumer, sequence, keys)
    SELECT consumer, delivered.store_sequence, array_agg(k)
    FROM @schema@.outbox o, unnest(o.keys) k WHERE o.id = ANY (ids)
    HAVING count(*) > 0;
  END IF;
  IF live <@ ARRAY[consumer] THEN
    PERFORM @schema@.forget(ids, live, true);
  ELSE
    UPDATE @schema@.outbox o SET delivered_to = o.delivered_to || consumer
    WHERE o.id = ANY (ids) AND NOT consumer = ANY (o.delivered_to);
    PERFORM @schema@.forget(ids, live, false);
    IF EXISTS (SELECT FROM @schema@.outbox o WHERE o.id = ANY (ids)) THEN
      PERFORM pg_notify('@channel@', '');
    END IF;
  END IF;
END
$fn$;
-- Writes `keys` to the outbox in the current transaction, as a captured write does (`CachedPool::invalidate`).
CREATE OR REPLACE FUNCTION @schema@.invalidate(keys text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
  @emit@
END
$fn$;
REVOKE ALL ON FUNCTION @schema@.invalidate(text[]) FROM PUBLIC;
-- Schema version 4's signature, for processes of older builds during a rolling deploy.
CREATE OR REPLACE FUNCTION @schema@.delivered(ids bigint[], consumer text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  SELECT @schema@.delivered(ids, consumer, 0)
$fn$;
-- The highest store sequence recorded with `consumer`'s deliveries.
CREATE OR REPLACE FUNCTION @schema@.acknowledged(consumer text) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  SELECT greatest(coalesce((SELECT c.store_sequence FROM @schema@.consumers c WHERE c.tag = consumer), 0),
                  coalesce((SELECT max(r.sequence) FROM @schema@.replay r WHERE r.consumer = acknowledged.consumer), 0))
$fn$;
-- The distinct keys of `consumer`'s deliveries above the store sequence `after` (at most `max_keys` + 1:
-- more means too many to replay); NULL when the window no longer reaches back to `after`. With them, in the
-- same snapshot, the keys of the outbox rows `consumer` has not marked delivered: a delivery the store
-- acknowledged before it went back whose rows are not deleted yet (its deleter batches) is recorded
-- nowhere else, and a row is either still in the outbox or in the window (its deletion records it).
CREATE OR REPLACE FUNCTION @schema@.replay_keys(consumer text, after bigint, max_keys integer) RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  SELECT CASE WHEN coalesce((SELECT c.store_sequence FROM @schema@.consumers c WHERE c.tag = consumer), 0) > after
              THEN NULL
              ELSE array(SELECT k FROM (SELECT k FROM @schema@.replay r, unnest(r.keys) k
                                        WHERE r.consumer = replay_keys.consumer AND r.sequence > after
                                        UNION
                                        SELECT k FROM @schema@.outbox o, unnest(o.keys) k
                                        WHERE NOT replay_keys.consumer = ANY (o.delivered_to)) AS d
                         LIMIT max_keys + 1) END
$fn$;
-- The window no longer reaches below `sequence`: deliveries at or below it were purged, or an invalidation
-- at it is not in the window (a namespace drop after the consumer missed rows).
CREATE OR REPLACE FUNCTION @schema@.cut_replay(consumer text, sequence bigint) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
  UPDATE @schema@.consumers c SET store_sequence = cut_replay.sequence
  WHERE c.tag = consumer AND c.store_sequence < cut_replay.sequence
$fn$;
-- Purges `consumer`'s deliveries older than `keep` (raising its cut); returns the deliveries left.
CREATE OR REPLACE FUNCTION @schema@.purge_replay(consumer text, keep interval) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  purged bigint;
BEGIN
  PERFORM set_config('synchronous_commit', 'off', true);
  WITH gone AS (
    DELETE FROM @schema@.replay r
    WHERE r.consumer = purge_replay.consumer AND r.delivered_at < now() - keep
    RETURNING r.sequence
  ) SELECT max(g.sequence) INTO purged FROM gone g;
  IF purged IS NOT NULL THEN
    PERFORM @schema@.cut_replay(consumer, purged);
  END IF;
  RETURN (SELECT count(*) FROM @schema@.replay r WHERE r.consumer = purge_replay.consumer);
END
$fn$;
