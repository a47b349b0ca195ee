-- A replay must know when the pruner overtook it.
--
-- The pruner deletes a cut tick's changes in seq-ordered batches and the ticks before it
-- only at the end, so a client's replay reading the oldest retained ticks meanwhile got
-- fewer rows without any error. Now the pruner records its cut before it deletes anything
-- (in the same transaction), and a replay that finds the cut at or past a tick it has yet
-- to read answers `Gone` instead of skipping.

ALTER TABLE quill.pruned ADD COLUMN cut_tick bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION quill.prune(max_age interval, max_events bigint, batch_size integer) RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    newest_seq bigint;
    by_count bigint;
    by_age bigint;
    cut bigint;
    readers bigint;
    snap pg_snapshot;
    removed bigint := 0;
    removed_max bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('quill.prune')) THEN
        RETURN 0;
    END IF;
    -- By count: the tick that delivered the change max_events before the newest.
    SELECT max(c.seq) INTO newest_seq FROM quill.change_log c;
    IF newest_seq IS NOT NULL AND newest_seq > max_events THEN
        SELECT quill.tick_of(max(c.seq)) INTO by_count
        FROM quill.change_log c WHERE c.seq <= newest_seq - max_events;
    END IF;
    -- By age: the newest tick made before the age limit (a tick is made after the commits
    -- it delivers, so this is commit time, not write time).
    SELECT max(t.id) INTO by_age FROM quill.tick t WHERE t.created_at < clock_timestamp() - max_age;
    cut := GREATEST(by_count, by_age);
    -- Nothing is beyond retention. (Checked before the reader floor: LEAST ignores NULLs.)
    IF cut IS NULL THEN
        RETURN 0;
    END IF;
    readers := quill.reader_floor();
    IF readers IS NOT NULL THEN
        cut := LEAST(cut, readers);
    END IF;
    SELECT t.snapshot INTO snap FROM quill.tick t WHERE t.id = cut;
    IF snap IS NULL THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM quill.change_log
        WHERE seq IN (
            SELECT c.seq FROM quill.change_log c
            WHERE c.xid < pg_snapshot_xmax(snap) AND pg_visible_in_snapshot(c.xid, snap)
            ORDER BY c.seq LIMIT batch_size)
        RETURNING seq
    )
    SELECT count(*), max(seq) INTO removed, removed_max FROM gone;
    IF removed_max IS NOT NULL THEN
        UPDATE quill.pruned
        SET max_seq = GREATEST(max_seq, removed_max), cut_tick = GREATEST(cut_tick, cut);
    END IF;
    IF removed < batch_size THEN
        DELETE FROM quill.tick WHERE id < cut;
    END IF;
    RETURN removed;
END
$$;
