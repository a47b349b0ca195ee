-- Retention by commit point, never past a running reader.
--
-- The old pruner cut by seq and by write time (changed_at). Both are taken when a row is
-- written, and a transaction commits later: a long transaction's changes could be deleted
-- before any tick delivered them. Now the cut is a tick: every change visible in the cut
-- tick's snapshot was delivered by that tick or an earlier one, and only those are deleted.
--
-- And never past a running reader: each reader records, on its own session, the tick it has
-- read through, and holds an advisory lock (class 'reader', its key) on that session. The
-- pruner ignores (and removes) rows whose lock nobody holds: that reader is gone.

CREATE TABLE quill.reader (
    key        integer PRIMARY KEY,
    -- every change up to this tick has been read; the tick itself bounds the next batch
    read_tick  bigint NOT NULL,
    reported_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- What pruning removed, so that a resume from a pruned position is told `Gone`.
CREATE TABLE quill.pruned (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    max_seq   bigint NOT NULL
);
INSERT INTO quill.pruned (max_seq) VALUES (0);

-- Called by a reader on its own session: takes its lock (once per session) and records
-- where it is.
CREATE FUNCTION quill.report_reader(reader_key integer, tick bigint, take_lock boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF take_lock THEN
        PERFORM pg_advisory_lock(quill.lock_class('reader'), reader_key);
    END IF;
    INSERT INTO quill.reader (key, read_tick) VALUES (reader_key, tick)
    ON CONFLICT (key) DO UPDATE SET read_tick = EXCLUDED.read_tick, reported_at = clock_timestamp();
END
$$;

-- The oldest tick a live reader still needs (NULL: no live reader). Forgets dead readers.
CREATE FUNCTION quill.reader_floor() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    floor_tick bigint;
BEGIN
    DELETE FROM quill.reader r
    WHERE NOT EXISTS (
        SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted
          AND l.classid = quill.lock_class('reader')::oid
          AND l.objid = r.key::oid AND l.objsubid = 2
    );
    SELECT min(r.read_tick) INTO floor_tick FROM quill.reader r;
    RETURN floor_tick;
END
$$;

DROP FUNCTION quill.prune(interval, bigint, integer);

-- Deletes up to batch_size changes beyond the retention limits and behind every live
-- reader; once none is left before the cut, also the ticks before it (the cut tick stays:
-- it bounds the next batch). One pruner at a time; returns how many changes it deleted,
-- so the caller repeats while it gets a full batch.
CREATE FUNCTION quill.prune(max_age interval, max_events bigint, batch_size integer) RETURNS bigint
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
        UPDATE quill.pruned SET max_seq = GREATEST(max_seq, removed_max);
    END IF;
    IF removed < batch_size THEN
        DELETE FROM quill.tick WHERE id < cut;
    END IF;
    RETURN removed;
END
$$;

-- The write-time index served only the old pruner; every captured insert paid for it.
DROP INDEX quill.change_log_changed_at;
