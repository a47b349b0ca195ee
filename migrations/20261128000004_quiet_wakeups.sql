-- Wake-ups only for readers that wait. A NOTIFY takes one cluster-wide lock from the
-- notifying transaction's pre-commit to the end of its commit, WAL flush included, so
-- notifying writers commit one at a time: with 4 writers that alone halved the insert rate.
-- While every reader is busy reading it looks at the log again anyway, so writers skip the
-- NOTIFY then.
--
-- The protocol uses advisory locks only, no rows, so a writer's snapshot (REPEATABLE READ,
-- or taken before a reader started) cannot hide a reader from it:
-- * A running quill holds "alive" in shared mode on a session of its own. No quill of this
--   kind running (or its session gone): writers notify, as they always did.
-- * A reader that waits for notifications holds "waiting" in shared mode on that session;
--   a busy reader lets it go.
-- * A writer takes "gate" in shared mode, held until it commits, then notifies unless it
--   finds "waiting" free.
-- * A reader that is about to wait takes "waiting", then passes the gate: it tries to take
--   "gate" exclusively, which succeeds only when every writer that might have skipped its
--   NOTIFY has committed; until then it keeps looking at the log every few milliseconds.
--   Only a try: a queued exclusive request would hold up every new writer behind a
--   transaction left open. Once through, it looks at the log once more and waits.
-- So a committed change is either in that last look or notifies.
--
-- Writers test a lock by taking it exclusively and letting go at once. Two writers testing
-- at the same instant see each other: that costs a spurious NOTIFY, never a missing one.

-- The advisory lock keys: (class, 0), a key space of its own.
CREATE FUNCTION quill.lock_class(name text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT hashtext('quill.' || name) $$;

-- The reader's side. Each returns false if the lock is not to be had right now.
CREATE FUNCTION quill.hold_alive() RETURNS boolean
LANGUAGE sql AS $$ SELECT pg_try_advisory_lock_shared(quill.lock_class('alive'), 0) $$;

CREATE FUNCTION quill.start_waiting() RETURNS boolean
LANGUAGE sql AS $$ SELECT pg_try_advisory_lock_shared(quill.lock_class('waiting'), 0) $$;

CREATE FUNCTION quill.stop_waiting() RETURNS boolean
LANGUAGE sql AS $$ SELECT pg_advisory_unlock_shared(quill.lock_class('waiting'), 0) $$;

-- Run it in a transaction of its own: the lock, if taken, goes with that transaction.
CREATE FUNCTION quill.pass_gate() RETURNS boolean
LANGUAGE sql AS $$ SELECT pg_try_advisory_xact_lock(quill.lock_class('gate'), 0) $$;

-- True if nobody holds `class` (tested without keeping it).
CREATE FUNCTION quill.lock_free(class integer) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_try_advisory_lock(class, 0) THEN
        PERFORM pg_advisory_unlock(class, 0);
        RETURN true;
    END IF;
    RETURN false;
END
$$;

-- The writer's side, once per captured statement.
CREATE FUNCTION quill.wake_readers() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(quill.lock_class('gate'), 0);
    IF quill.lock_free(quill.lock_class('alive')) OR NOT quill.lock_free(quill.lock_class('waiting')) THEN
        PERFORM pg_notify('quill_change', '');
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION quill.capture() RETURNS trigger
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
        PERFORM quill.wake_readers();
    END IF;
    RETURN NULL;
END
$$;
