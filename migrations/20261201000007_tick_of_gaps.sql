-- quill.tick_of searched tick ids by halving, assuming every id up to the newest exists.
-- Tick ids have gaps (a tick made in a transaction that rolled back, e.g. a reader killed
-- mid-poll): when the first tick at or after the middle was the upper bound itself, the
-- search stopped moving and the function ran forever (seen in the randomized model test).
-- Now a probe that finds no tick between the middle and the bound looks at the newest tick
-- below the middle instead, so every step moves a bound or ends the search.
CREATE OR REPLACE FUNCTION quill.tick_of(change_seq bigint) RETURNS bigint
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
    -- The answer is the first tick whose snapshot shows the change: in [lo, hi], and hi
    -- shows it. Visibility only grows with the tick id.
    WHILE lo < hi LOOP
        mid := lo + (hi - lo) / 2;
        SELECT t.id, t.snapshot INTO probe, snap FROM quill.tick t WHERE t.id >= mid ORDER BY t.id LIMIT 1;
        IF probe = hi THEN
            -- No tick in [mid, hi): the newest one below mid decides.
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
