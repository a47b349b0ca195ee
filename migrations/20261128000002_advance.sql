-- One round trip for the reader's poll: make a tick if anything committed since the last
-- one, then list every tick after `after_tick` (with its predecessor). The RETURN QUERY is
-- a later command than make_tick's insert, so it sees the new tick.
CREATE FUNCTION quill.advance(after_tick bigint)
RETURNS TABLE (prev bigint, tick bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM quill.make_tick();
    RETURN QUERY
        SELECT lag(t.id, 1, after_tick) OVER (ORDER BY t.id), t.id
        FROM quill.tick t
        WHERE t.id > after_tick
        ORDER BY t.id
        LIMIT 10000;
END
$$;
