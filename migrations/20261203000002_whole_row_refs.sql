-- Whole-row references as `alias.*`: a bare `row_to_json(n)` means the column `n` when the
-- captured table has one (a table with a column named n, o or r could not be updated, or
-- written at all, with quill capturing it: "column reference is ambiguous"). Likewise the
-- update trigger's variables (`key`, `update_kind`) win over columns of those names.

CREATE OR REPLACE FUNCTION quill.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    logged bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO quill.change_log (table_schema, table_name, kind, row_data)
        SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'created', row_to_json(r.*) FROM quill_new r;
    ELSIF TG_OP = 'UPDATE' THEN
        -- quill tags PUT with SET LOCAL quill.method = 'update'; every other UPDATE is a patch.
        INSERT INTO quill.change_log (table_schema, table_name, kind, row_data)
        SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME,
               CASE WHEN current_setting('quill.method', true) = 'update'
                    THEN 'updated' ELSE 'patched' END,
               row_to_json(r.*)
        FROM quill_new r;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO quill.change_log (table_schema, table_name, kind, row_data)
        SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, 'removed', row_to_json(r.*) FROM quill_old r;
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

CREATE OR REPLACE FUNCTION quill.capture_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    logged bigint;
    update_kind text;
    key text := TG_ARGV[0];
    nestloop text;
    new_row json;
    old_row json;
BEGIN
    -- quill tags PUT with SET LOCAL quill.method = 'update'; every other UPDATE is a patch.
    update_kind := CASE WHEN current_setting('quill.method', true) = 'update'
                        THEN 'updated' ELSE 'patched' END;
    IF (SELECT count(*) FROM (SELECT 1 FROM quill_new LIMIT 2) two) = 1 THEN
        -- One row: the old row is the only one, each turned into JSON once. A changed id
        -- is removed under the old id, then patched under the new one.
        SELECT row_to_json(n.*), row_to_json(o.*) INTO new_row, old_row FROM quill_new n, quill_old o;
        IF (new_row -> key)::text IS DISTINCT FROM (old_row -> key)::text THEN
            INSERT INTO quill.change_log (table_schema, table_name, kind, row_data, old_data)
            VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'removed', old_row, NULL),
                   (TG_TABLE_SCHEMA, TG_TABLE_NAME, update_kind, new_row, NULL);
        ELSE
            INSERT INTO quill.change_log (table_schema, table_name, kind, row_data, old_data)
            VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, update_kind, new_row, old_row);
        END IF;
        GET DIAGNOSTICS logged = ROW_COUNT;
    ELSE
        nestloop := current_setting('enable_nestloop');
        PERFORM set_config('enable_nestloop', 'off', true);
        INSERT INTO quill.change_log (table_schema, table_name, kind, row_data, old_data)
        SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, x.kind, x.row_data, x.old_data FROM (
            SELECT 0 AS part, 'removed' AS kind, row_to_json(o.*) AS row_data, NULL::json AS old_data
            FROM quill_old o
            WHERE NOT EXISTS (SELECT 1 FROM quill_new n WHERE to_jsonb(n.*) -> key = to_jsonb(o.*) -> key)
            UNION ALL
            SELECT 1, update_kind, row_to_json(n.*), row_to_json(o.*)
            FROM quill_new n LEFT JOIN quill_old o ON to_jsonb(o.*) -> key = to_jsonb(n.*) -> key
        ) x ORDER BY x.part;
        GET DIAGNOSTICS logged = ROW_COUNT;
        PERFORM set_config('enable_nestloop', nestloop, true);
    END IF;
    IF logged > 0 THEN
        PERFORM quill.wake_readers();
    END IF;
    RETURN NULL;
END
$$;
