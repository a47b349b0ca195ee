-- TRUNCATE is captured too: one 'truncated' change per truncated table, with no row. Before,
-- a TRUNCATE left every subscriber's copy of the table silently stale.
ALTER TABLE quill.change_log DROP CONSTRAINT change_log_kind_check;
ALTER TABLE quill.change_log ADD CONSTRAINT change_log_kind_check
    CHECK (kind IN ('created', 'updated', 'patched', 'removed', 'truncated'));

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
    ELSIF TG_OP = 'TRUNCATE' THEN
        INSERT INTO quill.change_log (table_schema, table_name, kind, row_data)
        VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'truncated', '{}');
    END IF;
    GET DIAGNOSTICS logged = ROW_COUNT;
    IF logged > 0 THEN
        PERFORM quill.wake_readers();
    END IF;
    RETURN NULL;
END
$$;
