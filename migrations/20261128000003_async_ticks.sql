-- Ticks commit without waiting for their WAL flush: under load the reader makes hundreds
-- of ticks a second, and each synchronous commit competed with the writers' own flushes.
-- A tick lost in a PostgreSQL crash costs no change: the next tick's snapshot covers the
-- same transactions, so they are delivered again (at most once more), never skipped.
CREATE OR REPLACE FUNCTION quill.make_tick() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    prev pg_snapshot;
    made bigint;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
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
