-- quill's change capture: a change log written by statement-level triggers, and "ticks"
-- that cut the log into batches in commit order.
--
-- Why ticks: sequence numbers are handed out when a row is written, but transactions commit
-- in another order, so "read everything after the last seq" skips rows of a transaction that
-- commits late. Each tick stores a snapshot; the batch of tick N is every logged change whose
-- transaction is visible in tick N's snapshot and was not in tick N-1's. Batches follow commit
-- order, changes inside a batch follow seq (so changes to one row keep the order they were
-- made in), and no committed change can fall between two ticks. (The same idea as PgQ.)

CREATE SCHEMA IF NOT EXISTS quill;

CREATE TABLE quill.change_log (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    table_schema text NOT NULL,
    table_name   text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('created', 'updated', 'patched', 'removed')),
    -- the new row; for 'removed' the removed row
    row_data     json NOT NULL,
    changed_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX change_log_xid ON quill.change_log (xid);
CREATE INDEX change_log_changed_at ON quill.change_log (changed_at);

CREATE TABLE quill.tick (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    snapshot   pg_snapshot NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Everything committed before quill was installed is history, not news.
INSERT INTO quill.tick (snapshot) VALUES (pg_current_snapshot());

-- The trigger function behind every captured table. Statement-level with transition tables:
-- one log insert and one NOTIFY per statement, one log row (and so one event) per row.
-- SECURITY DEFINER so that any role that may write the table may log the change.
CREATE FUNCTION quill.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    logged bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO quill.change_log (table_schema, table_name, kind, row_data)
        SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'created', row_to_json(r) FROM quill_new r;
    ELSIF TG_OP = 'UPDATE' THEN
        -- quill tags PUT with SET LOCAL quill.method = 'update'; every other UPDATE is a patch.
        INSERT INTO quill.change_log (table_schema, table_name, kind, row_data)
        SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME,
               CASE WHEN current_setting('quill.method', true) = 'update'
                    THEN 'updated' ELSE 'patched' END,
               row_to_json(r)
        FROM quill_new r;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO quill.change_log (table_schema, table_name, kind, row_data)
        SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'removed', row_to_json(r) FROM quill_old r;
    END IF;
    GET DIAGNOSTICS logged = ROW_COUNT;
    IF logged > 0 THEN
        -- A constant payload: Postgres folds it to one wake-up per transaction, and the
        -- payload can never exceed NOTIFY's 8000-byte limit whatever the row size.
        PERFORM pg_notify('quill_change', '');
    END IF;
    RETURN NULL;
END
$$;

-- Makes a new tick if anything committed since the last one; returns its id or NULL.
-- Serialized by an advisory lock so that ticks from several quill instances are strictly
-- ordered: each snapshot is taken after the previous tick committed.
CREATE FUNCTION quill.make_tick() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    prev pg_snapshot;
    made bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('quill.tick'));
    SELECT snapshot INTO prev FROM quill.tick ORDER BY id DESC LIMIT 1;
    IF prev IS NULL OR EXISTS (
        SELECT 1 FROM quill.change_log c
        WHERE c.xid >= pg_snapshot_xmin(prev) AND NOT pg_visible_in_snapshot(c.xid, prev)
    ) THEN
        INSERT INTO quill.tick (snapshot) VALUES (pg_current_snapshot()) RETURNING id INTO made;
    END IF;
    RETURN made;
END
$$;

-- The seq numbers of tick this_tick's batch, in order: every change whose transaction is
-- visible in this tick's snapshot and was not in the previous tick's. Uses the xid index:
-- such a transaction was running or not yet started at prev, so its xid >= xmin(prev).
CREATE FUNCTION quill.batch(prev_tick bigint, this_tick bigint)
RETURNS TABLE (seq bigint)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    p pg_snapshot;
    n pg_snapshot;
BEGIN
    SELECT t.snapshot INTO p FROM quill.tick t WHERE t.id = prev_tick;
    SELECT t.snapshot INTO n FROM quill.tick t WHERE t.id = this_tick;
    IF p IS NULL OR n IS NULL THEN
        RAISE EXCEPTION 'quill: tick % or % no longer exists', prev_tick, this_tick
            USING ERRCODE = 'QL001';
    END IF;
    RETURN QUERY
        SELECT c.seq FROM quill.change_log c
        WHERE c.xid >= pg_snapshot_xmin(p)
          AND pg_visible_in_snapshot(c.xid, n)
          AND NOT pg_visible_in_snapshot(c.xid, p)
        ORDER BY c.seq;
END
$$;

-- The tick that delivered the change at `change_seq`, or NULL if that change is no longer
-- retained or not yet in any tick. Visibility only grows with the tick id, so a binary
-- search over ticks finds the first tick whose snapshot sees the change's transaction.
CREATE FUNCTION quill.tick_of(change_seq bigint) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    x xid8;
    lo bigint;
    hi bigint;
    mid bigint;
    probe bigint;
    snap pg_snapshot;
BEGIN
    SELECT c.xid INTO x FROM quill.change_log c WHERE c.seq = change_seq;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT min(t.id), max(t.id) INTO lo, hi FROM quill.tick t;
    SELECT t.snapshot INTO snap FROM quill.tick t WHERE t.id = hi;
    IF hi IS NULL OR NOT pg_visible_in_snapshot(x, snap) THEN
        RETURN NULL;
    END IF;
    WHILE lo < hi LOOP
        mid := lo + (hi - lo) / 2;
        SELECT t.id, t.snapshot INTO probe, snap FROM quill.tick t WHERE t.id >= mid ORDER BY t.id LIMIT 1;
        IF pg_visible_in_snapshot(x, snap) THEN
            hi := probe;
        ELSE
            lo := probe + 1;
        END IF;
    END LOOP;
    RETURN hi;
END
$$;

-- Deletes up to batch_size of the oldest changes beyond the retention limits, and the ticks
-- no retained change needs (keeping the newest tick older than the oldest retained change:
-- it bounds that change's batch). One pruner at a time across instances; returns how many
-- changes it deleted, so the caller repeats while it gets a full batch. Short transactions,
-- no lock that writers wait on.
CREATE FUNCTION quill.prune(max_age interval, max_events bigint, batch_size integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    cut bigint;
    by_age bigint;
    removed bigint := 0;
    boundary bigint;
    newest bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('quill.prune')) THEN
        RETURN 0;
    END IF;
    SELECT max(c.seq) - max_events INTO cut FROM quill.change_log c;
    SELECT max(c.seq) INTO by_age FROM quill.change_log c WHERE c.changed_at < clock_timestamp() - max_age;
    cut := GREATEST(cut, by_age);
    IF cut IS NOT NULL THEN
        DELETE FROM quill.change_log
        WHERE seq IN (SELECT c.seq FROM quill.change_log c WHERE c.seq <= cut ORDER BY c.seq LIMIT batch_size);
        GET DIAGNOSTICS removed = ROW_COUNT;
    END IF;
    SELECT max(t.id) INTO newest FROM quill.tick t;
    SELECT max(t.id) INTO boundary FROM quill.tick t
    WHERE t.created_at < COALESCE((SELECT min(c.changed_at) FROM quill.change_log c), 'infinity');
    DELETE FROM quill.tick WHERE id < LEAST(boundary, newest);
    RETURN removed;
END
$$;
