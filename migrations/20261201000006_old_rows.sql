-- Old rows in the log: an UPDATE records the row as it was beside the row as it is, so
-- every consumer can tell where a row was and where it is now (a row that leaves a query's
-- or a channel's scope is announced; Supabase-style `old` records are possible).
--
-- The update trigger (quill.capture_update; quill.capture keeps serving older triggers)
-- pairs the statement's old and new rows by the table's id column, which quill passes as
-- the trigger's argument. A row whose id the statement changed is
-- logged as removed (under its old id) and then patched (under its new id, without an old
-- row), in that order, so a copy keyed by id stays right.

ALTER TABLE quill.change_log ADD COLUMN old_data json;

-- The id column of each captured table, for triggers re-created by the DDL event trigger.
ALTER TABLE quill.captured ADD COLUMN id_column text;

-- The update trigger of a table: the old row beside the new, paired by the id column (the
-- trigger's argument, read as a JSON key so the SQL is static and its plan kept). Hash
-- joins only: a plan kept from a one-row UPDATE must not nest-loop a 100 000-row one.
CREATE FUNCTION quill.capture_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_nestloop = off AS $$
DECLARE
    logged bigint;
    update_kind text;
    key text := TG_ARGV[0];
BEGIN
    -- quill tags PUT with SET LOCAL quill.method = 'update'; every other UPDATE is a patch.
    update_kind := CASE WHEN current_setting('quill.method', true) = 'update'
                        THEN 'updated' ELSE 'patched' END;
    -- A row whose id changed: removed under its old id, then patched under the new one.
    INSERT INTO quill.change_log (table_schema, table_name, kind, row_data, old_data)
    SELECT TG_TABLE_SCHEMA, TG_TABLE_NAME, x.kind, x.row_data, x.old_data FROM (
        SELECT 0 AS part, 'removed' AS kind, row_to_json(o) AS row_data, NULL::json AS old_data
        FROM quill_old o
        WHERE NOT EXISTS (SELECT 1 FROM quill_new n WHERE to_jsonb(n) -> key = to_jsonb(o) -> key)
        UNION ALL
        SELECT 1, update_kind, row_to_json(n), row_to_json(o)
        FROM quill_new n LEFT JOIN quill_old o ON to_jsonb(o) -> key = to_jsonb(n) -> key
    ) x ORDER BY x.part;
    GET DIAGNOSTICS logged = ROW_COUNT;
    IF logged > 0 THEN
        PERFORM quill.wake_readers();
    END IF;
    RETURN NULL;
END
$$;

-- The readers' queries return the old row too (a new column: the functions are re-made).
DROP FUNCTION quill.poll(bigint, integer);
DROP FUNCTION quill.read_ticks(bigint, bigint, integer);

CREATE FUNCTION quill.read_ticks(after_tick bigint, until_tick bigint, max_rows integer)
RETURNS TABLE (prev bigint, tick bigint, read_later boolean, seq bigint, table_schema text,
               table_name text, kind text, row_data json, old_data json)
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
            RETURN QUERY SELECT t.prev, t.id, true, NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::json, NULL::json;
        ELSIF cardinality(seqs) = 0 THEN
            RETURN QUERY SELECT t.prev, t.id, false, NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::json, NULL::json;
        ELSE
            room := room - cardinality(seqs);
            RETURN QUERY
                SELECT t.prev, t.id, false, c.seq, c.table_schema, c.table_name, c.kind, c.row_data, c.old_data
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
               table_name text, kind text, row_data json, old_data json)
LANGUAGE plpgsql SET enable_seqscan = off AS $$
BEGIN
    PERFORM quill.make_tick();
    RETURN QUERY SELECT * FROM quill.read_ticks(after_tick, NULL, max_rows);
END
$$;

-- Re-created captured tables get the update trigger with old rows too.
CREATE OR REPLACE FUNCTION quill.on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cmd record;
    id_column text;
    touched boolean := false;
BEGIN
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        IF cmd.object_type = 'table' AND cmd.command_tag IN ('CREATE TABLE', 'ALTER TABLE', 'CREATE TABLE AS', 'SELECT INTO') THEN
            SELECT c.id_column INTO id_column FROM quill.captured c JOIN pg_class k ON k.oid = cmd.objid
              JOIN pg_namespace n ON n.oid = k.relnamespace
             WHERE c.table_schema = n.nspname AND c.table_name = k.relname;
            IF FOUND THEN
                touched := true;
                IF cmd.command_tag <> 'ALTER TABLE' THEN
                  BEGIN
                    EXECUTE format('CREATE OR REPLACE TRIGGER quill_capture_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS quill_new FOR EACH STATEMENT EXECUTE FUNCTION quill.capture()', cmd.objid::regclass);
                    IF id_column IS NULL THEN
                        EXECUTE format('CREATE OR REPLACE TRIGGER quill_capture_update AFTER UPDATE ON %s REFERENCING NEW TABLE AS quill_new FOR EACH STATEMENT EXECUTE FUNCTION quill.capture()', cmd.objid::regclass);
                    ELSE
                        EXECUTE format('CREATE OR REPLACE TRIGGER quill_capture_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS quill_old NEW TABLE AS quill_new FOR EACH STATEMENT EXECUTE FUNCTION quill.capture_update(%L)', cmd.objid::regclass, id_column);
                    END IF;
                    EXECUTE format('CREATE OR REPLACE TRIGGER quill_capture_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS quill_old FOR EACH STATEMENT EXECUTE FUNCTION quill.capture()', cmd.objid::regclass);
                    EXECUTE format('CREATE OR REPLACE TRIGGER quill_capture_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION quill.capture()', cmd.objid::regclass);
                  EXCEPTION WHEN OTHERS THEN
                    -- e.g. re-created as a partition: quill's periodic check reports it;
                    -- the user's CREATE TABLE goes through.
                    RAISE WARNING 'quill: cannot capture %: %', cmd.objid::regclass, SQLERRM;
                  END;
                END IF;
            END IF;
        END IF;
    END LOOP;
    IF touched THEN
        PERFORM pg_notify('quill_change', 'schema');
    END IF;
END
$$;
