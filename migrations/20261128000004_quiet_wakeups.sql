-- Wake-ups only for readers that wait. A NOTIFY takes one cluster-wide lock from the
-- notifying transaction's pre-commit to the end of its commit, WAL flush included, so
-- notifying writers commit one at a time: with 4 writers that alone halved the insert rate.
-- While a reader is busy reading it looks at the log again anyway, so writers skip the
-- NOTIFY then.
--
-- The protocol, with advisory locks (not rows: a writer's snapshot could be older than a
-- reader's update):
-- * Each reader registers a row here and holds its "alive" lock for its session's life.
-- * A busy reader holds its "reading" lock (session level).
-- * A writer takes the "gate" lock in shared mode, held until it commits, then notifies
--   unless every registered reader holds its reading lock.
-- * A reader that stops reading releases its lock, then passes the gate: it takes the gate
--   exclusively, which waits for every writer that might have skipped its NOTIFY to commit,
--   and then it looks at the log once more before it waits for a notification.
-- So a committed change is either in that last look or notifies. A stale row (its session
-- gone) holds no reading lock, so it only makes writers notify, as before.

CREATE TABLE quill.reader (
    id         integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The advisory lock keys: (class, reader id), a key space of its own.
CREATE FUNCTION quill.lock_class(name text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT hashtext('quill.' || name) $$;

-- Registers the calling session as a reader; returns its id. Deletes the rows of readers
-- whose session is gone (their alive lock is free).
CREATE FUNCTION quill.register_reader() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    me integer;
BEGIN
    DELETE FROM quill.reader r WHERE pg_try_advisory_xact_lock(quill.lock_class('alive'), r.id);
    INSERT INTO quill.reader DEFAULT VALUES RETURNING id INTO me;
    PERFORM pg_advisory_lock(quill.lock_class('alive'), me);
    RETURN me;
END
$$;

-- Called by a busy reader on its registered session; false if writers hold it off.
CREATE FUNCTION quill.start_reading(reader integer) RETURNS boolean
LANGUAGE sql AS $$ SELECT pg_try_advisory_lock(quill.lock_class('reading'), reader) $$;

-- Called on the same session before the reader waits; then pass_gate().
CREATE FUNCTION quill.stop_reading(reader integer) RETURNS boolean
LANGUAGE sql AS $$ SELECT pg_advisory_unlock(quill.lock_class('reading'), reader) $$;

-- Returns once every transaction that may have skipped its NOTIFY has ended. Run it in its
-- own transaction: the lock is released at its end.
CREATE FUNCTION quill.pass_gate() RETURNS void
LANGUAGE sql AS $$ SELECT pg_advisory_xact_lock(quill.lock_class('gate'), 0) $$;

-- The writer's side, once per captured statement.
CREATE FUNCTION quill.wake_readers() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    reader integer;
    reading integer := quill.lock_class('reading');
BEGIN
    PERFORM pg_advisory_xact_lock_shared(quill.lock_class('gate'), 0);
    FOR reader IN SELECT r.id FROM quill.reader r LOOP
        -- Free means that reader is not reading: test it without keeping it, or a reader
        -- could never start reading while writers keep coming.
        IF pg_try_advisory_lock_shared(reading, reader) THEN
            PERFORM pg_advisory_unlock_shared(reading, reader);
            PERFORM pg_notify('quill_change', '');
            RETURN;
        END IF;
    END LOOP;
    -- Every reader reads, or none is registered: then notify, for the reader of an older
    -- quill that does not register. (After a FOR loop, FOUND says whether it had a row.)
    IF NOT FOUND THEN
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
