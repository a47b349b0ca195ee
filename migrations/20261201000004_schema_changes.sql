-- Schema changes under a running quill. quill reads a table's catalog again when its shape
-- changes (it checks every few seconds, and at once when this event trigger says so), and a
-- captured table that is dropped and created again gets its capture triggers back. With the
-- event trigger that happens inside the CREATE TABLE itself, so no write to the new table
-- goes uncaptured; without it (event triggers need a superuser) within one check interval.

-- The tables quill captures, recorded by quill when it installs capture.
CREATE TABLE quill.captured (
    table_schema text NOT NULL,
    table_name   text NOT NULL,
    PRIMARY KEY (table_schema, table_name)
);

-- SECURITY DEFINER: event triggers run as whoever issues the DDL, who may have no rights
-- on schema quill; their DDL must never fail because of quill.
CREATE FUNCTION quill.on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cmd record;
    touched boolean := false;
BEGIN
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        IF cmd.object_type = 'table' AND cmd.command_tag IN ('CREATE TABLE', 'ALTER TABLE', 'CREATE TABLE AS', 'SELECT INTO') THEN
            PERFORM 1 FROM quill.captured c JOIN pg_class k ON k.oid = cmd.objid
              JOIN pg_namespace n ON n.oid = k.relnamespace
             WHERE c.table_schema = n.nspname AND c.table_name = k.relname;
            IF FOUND THEN
                touched := true;
                IF cmd.command_tag <> 'ALTER TABLE' THEN
                  BEGIN
                    EXECUTE format('CREATE OR REPLACE TRIGGER quill_capture_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS quill_new FOR EACH STATEMENT EXECUTE FUNCTION quill.capture()', cmd.objid::regclass);
                    EXECUTE format('CREATE OR REPLACE TRIGGER quill_capture_update AFTER UPDATE ON %s REFERENCING NEW TABLE AS quill_new FOR EACH STATEMENT EXECUTE FUNCTION quill.capture()', cmd.objid::regclass);
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

-- A dropped captured table: quill stops naming it until it is back.
CREATE FUNCTION quill.on_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_event_trigger_dropped_objects() d
        JOIN quill.captured c ON c.table_schema = d.schema_name AND c.table_name = d.object_name
        WHERE d.object_type = 'table'
    ) THEN
        PERFORM pg_notify('quill_change', 'schema');
    END IF;
END
$$;

DO $$
BEGIN
    CREATE EVENT TRIGGER quill_ddl ON ddl_command_end EXECUTE FUNCTION quill.on_ddl();
    CREATE EVENT TRIGGER quill_drop ON sql_drop EXECUTE FUNCTION quill.on_drop();
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'quill: no event triggers (they need a superuser); schema changes are noticed by periodic checks';
END
$$;
