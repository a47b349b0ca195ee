-- The readers' queries also return when each change was written (`changed_at`, the
-- trigger's clock_timestamp(), as microseconds since the epoch): Supabase-style
-- `commit_timestamp`s need it. The functions are re-made for the new column.

-- A time as microseconds since the epoch (exact: a timestamptz has microseconds).
CREATE FUNCTION quill.unix_us(at timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT (extract(epoch FROM at) * 1000000)::bigint $$;

DROP FUNCTION quill.poll(bigint, integer);
DROP FUNCTION quill.read_ticks(bigint, bigint, integer);

CREATE FUNCTION quill.read_ticks(after_tick bigint, until_tick bigint, max_rows integer)
RETURNS TABLE (prev bigint, tick bigint, read_later boolean, seq bigint, table_schema text,
               table_name text, kind text, row_data json, old_data json, written_us bigint)
LANGUAGE plpgsql STABLE SET enable_seqscan = off AS $$
DECLARE
    t record;
    seqs bigint[];
    room integer := max_rows;
    overflowed boolean := false;
BEGIN
    FOR t IN
        SELECT lag(x.id, 1, after_tick) OVER (ORDER BY x.id) AS prev, x.id AS id
        FROM quill.tick x
        WHERE x.id > after_tick AND (until_tick IS NULL OR x.id <= until_tick)
        ORDER BY x.id
        LIMIT 10000
    LOOP
        IF NOT overflowed THEN
            seqs := ARRAY(SELECT b.seq FROM quill.batch(t.prev, t.id) b);
            overflowed := cardinality(seqs) > room;
        END IF;
        IF overflowed THEN
            RETURN QUERY SELECT t.prev, t.id, true, NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::json, NULL::json, NULL::bigint;
        ELSIF cardinality(seqs) = 0 THEN
            RETURN QUERY SELECT t.prev, t.id, false, NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::json, NULL::json, NULL::bigint;
        ELSE
            room := room - cardinality(seqs);
            RETURN QUERY
                SELECT t.prev, t.id, false, c.seq, c.table_schema, c.table_name, c.kind, c.row_data, c.old_data,
                       quill.unix_us(c.changed_at)
                FROM quill.change_log c
                WHERE c.seq = ANY (seqs)
                ORDER BY c.seq;
        END IF;
        EXIT WHEN overflowed;
    END LOOP;
END
$$;

CREATE FUNCTION quill.poll(after_tick bigint, max_rows integer)
RETURNS TABLE (prev bigint, tick bigint, read_later boolean, seq bigint, table_schema text,
               table_name text, kind text, row_data json, old_data json, written_us bigint)
LANGUAGE plpgsql SET enable_seqscan = off AS $$
BEGIN
    PERFORM quill.make_tick();
    RETURN QUERY SELECT * FROM quill.read_ticks(after_tick, NULL, max_rows);
END
$$;
