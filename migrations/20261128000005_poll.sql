-- Ticks stay cheap as the log grows. make_tick and batch filtered the log by
-- `xid >= xmin(snapshot)` alone. PostgreSQL has no statistics for xid8, so it guessed a third
-- of the log matches and make_tick's EXISTS chose a sequential scan: 2-4 ms per tick at
-- 40 000 logged changes, growing with retention. A range (`xid < xmax`, true of every
-- transaction either snapshot can see) gets the small range estimate and the xid index.
-- And the reader's functions never scan the whole log: PL/pgSQL keeps a session's plans,
-- and a plan made while the log was nearly empty (a fresh install, the bench) was a
-- sequential scan that stayed one while the log grew. `enable_seqscan = off` makes every
-- plan use the indexes, which is right at any size.
-- A tick is made only when a change committed since the previous one: a transaction still
-- open used to make an empty tick at every look.
CREATE OR REPLACE FUNCTION quill.make_tick() RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    prev pg_snapshot;
    now_visible pg_snapshot;
    made bigint;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtext('quill.tick'));
    SELECT snapshot INTO prev FROM quill.tick ORDER BY id DESC LIMIT 1;
    now_visible := pg_current_snapshot();
    IF prev IS NULL OR EXISTS (
        SELECT 1 FROM quill.change_log c
        WHERE c.xid >= pg_snapshot_xmin(prev)
          AND c.xid < pg_snapshot_xmax(now_visible)
          AND NOT pg_visible_in_snapshot(c.xid, prev)
          AND pg_visible_in_snapshot(c.xid, now_visible)
    ) THEN
        INSERT INTO quill.tick (snapshot) VALUES (now_visible) RETURNING id INTO made;
    END IF;
    RETURN made;
END
$$;

CREATE OR REPLACE FUNCTION quill.batch(prev_tick bigint, this_tick bigint)
RETURNS TABLE (seq bigint)
LANGUAGE plpgsql STABLE SET enable_seqscan = off AS $$
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
          AND c.xid < pg_snapshot_xmax(n)
          AND pg_visible_in_snapshot(c.xid, n)
          AND NOT pg_visible_in_snapshot(c.xid, p)
        ORDER BY c.seq;
END
$$;

-- The live reader's poll in one round trip: make a tick if anything committed, then return
-- the changes of every tick after `after_tick`, in delivery order, while they fit in
-- `max_rows`. (Before, the reader needed three: advance, batch, then the rows.)
--
-- Rows, one of three kinds:
-- * seq NOT NULL: a change of `tick`; every change of that tick is in this result;
-- * seq NULL, read_later: `tick` did not fit; the caller reads it page by page, and every
--   later tick comes back this way too, so that order is kept;
-- * seq NULL, NOT read_later: `tick` holds no change (its transaction was still running),
--   listed so that the caller's position moves past it.
CREATE FUNCTION quill.poll(after_tick bigint, max_rows integer)
RETURNS TABLE (prev bigint, tick bigint, read_later boolean, seq bigint, table_schema text,
               table_name text, kind text, row_data json)
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    t record;
    seqs bigint[];
    room integer := max_rows;
    overflowed boolean := false;
BEGIN
    PERFORM quill.make_tick();
    FOR t IN
        SELECT lag(x.id, 1, after_tick) OVER (ORDER BY x.id) AS prev, x.id AS id
        FROM quill.tick x
        WHERE x.id > after_tick
        ORDER BY x.id
        LIMIT 10000
    LOOP
        IF NOT overflowed THEN
            seqs := ARRAY(SELECT b.seq FROM quill.batch(t.prev, t.id) b);
            overflowed := cardinality(seqs) > room;
        END IF;
        IF overflowed THEN
            RETURN QUERY SELECT t.prev, t.id, true, NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::json;
        ELSIF cardinality(seqs) = 0 THEN
            RETURN QUERY SELECT t.prev, t.id, false, NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::json;
        ELSE
            room := room - cardinality(seqs);
            RETURN QUERY
                SELECT t.prev, t.id, false, c.seq, c.table_schema, c.table_name, c.kind, c.row_data
                FROM quill.change_log c
                WHERE c.seq = ANY (seqs)
                ORDER BY c.seq;
        END IF;
    END LOOP;
END
$$;
