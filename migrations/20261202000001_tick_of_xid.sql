-- The tick that delivered a transaction, by its id: a client that wrote through quill is
-- given its transaction's id and may ask to be told when that tick has reached it.
-- quill.tick_of(seq) is the same search, for the transaction of a logged change.
CREATE OR REPLACE FUNCTION quill.tick_of_xid(x xid8) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    lo bigint;
    hi bigint;
    mid bigint;
    probe bigint;
    snap pg_snapshot;
BEGIN
    SELECT min(t.id), max(t.id) INTO lo, hi FROM quill.tick t;
    SELECT t.snapshot INTO snap FROM quill.tick t WHERE t.id = hi;
    IF hi IS NULL OR NOT pg_visible_in_snapshot(x, snap) THEN
        RETURN NULL;
    END IF;
    -- The answer is the first tick whose snapshot shows the transaction: in [lo, hi], and
    -- hi shows it. Visibility only grows with the tick id; ids may have gaps.
    WHILE lo < hi LOOP
        mid := lo + (hi - lo) / 2;
        SELECT t.id, t.snapshot INTO probe, snap FROM quill.tick t WHERE t.id >= mid ORDER BY t.id LIMIT 1;
        IF probe = hi THEN
            SELECT t.id, t.snapshot INTO probe, snap FROM quill.tick t
            WHERE t.id >= lo AND t.id < mid ORDER BY t.id DESC LIMIT 1;
            IF NOT FOUND OR NOT pg_visible_in_snapshot(x, snap) THEN
                RETURN hi;
            END IF;
            hi := probe;
        ELSIF pg_visible_in_snapshot(x, snap) THEN
            hi := probe;
        ELSE
            lo := probe + 1;
        END IF;
    END LOOP;
    RETURN hi;
END
$$;

CREATE OR REPLACE FUNCTION quill.tick_of(change_seq bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT quill.tick_of_xid(c.xid) FROM quill.change_log c WHERE c.seq = change_seq
$$;

-- The newest seq of one tick's batch: the resume position of "everything through this tick".
CREATE FUNCTION quill.last_seq_of_tick(this_tick bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT max(c.seq)
    FROM quill.tick n
    JOIN LATERAL (SELECT p.snapshot FROM quill.tick p WHERE p.id < n.id ORDER BY p.id DESC LIMIT 1) p ON true
    JOIN quill.change_log c
      ON c.xid >= pg_snapshot_xmin(p.snapshot)
     AND c.xid < pg_snapshot_xmax(n.snapshot)
     AND pg_visible_in_snapshot(c.xid, n.snapshot)
     AND NOT pg_visible_in_snapshot(c.xid, p.snapshot)
    WHERE n.id = this_tick
$$;
