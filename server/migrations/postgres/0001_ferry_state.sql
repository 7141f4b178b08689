-- Ferry's own bookkeeping on PostgreSQL. App tables are created from the schema.

CREATE TABLE ferry_devices (
    device_id      TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL,
    next_batch_seq BIGINT NOT NULL DEFAULT 1,
    last_digest    BYTEA,
    last_result    BYTEA,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen_at   TIMESTAMPTZ
);

CREATE TABLE ferry_key_map (
    device_id TEXT NOT NULL,
    tbl       TEXT NOT NULL,
    temporary BIGINT NOT NULL,
    real      BIGINT NOT NULL,
    PRIMARY KEY (device_id, tbl, temporary)
);

-- The change feed: the latest change of every synced row. `version` comes from a sequence at
-- write time; `xid` is the writing transaction, so readers can serve only what no in-progress
-- transaction can still precede (R11).
CREATE SEQUENCE ferry_version_seq;
CREATE TABLE ferry_rows (
    tbl     TEXT NOT NULL,
    pk      TEXT NOT NULL,
    version BIGINT NOT NULL,
    xid     xid8 NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (tbl, pk)
);
CREATE INDEX ferry_rows_by_version ON ferry_rows (version);

CREATE TABLE ferry_apply_log (
    id        BIGSERIAL PRIMARY KEY,
    device_id TEXT NOT NULL,
    batch_seq BIGINT NOT NULL,
    event_seq BIGINT NOT NULL,
    tbl       TEXT NOT NULL,
    op        TEXT NOT NULL
);

CREATE TABLE ferry_schemas (
    version   TEXT PRIMARY KEY,
    schema    TEXT NOT NULL,
    served_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Generic capture trigger: records the latest change of a row in ferry_rows.
-- Trigger arguments are the table's primary-key column names.
CREATE FUNCTION ferry_capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    new_key text;
    old_key text;
BEGIN
    IF TG_OP <> 'DELETE' THEN
        SELECT jsonb_agg(to_jsonb(NEW) -> c ORDER BY o)::text INTO new_key
        FROM unnest(TG_ARGV) WITH ORDINALITY AS k(c, o);
        INSERT INTO ferry_rows (tbl, pk, version, xid, deleted)
        VALUES (TG_TABLE_NAME, new_key, nextval('ferry_version_seq'), pg_current_xact_id(), false)
        ON CONFLICT (tbl, pk) DO UPDATE
            SET version = EXCLUDED.version, xid = EXCLUDED.xid, deleted = false;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        SELECT jsonb_agg(to_jsonb(OLD) -> c ORDER BY o)::text INTO old_key
        FROM unnest(TG_ARGV) WITH ORDINALITY AS k(c, o);
        IF TG_OP = 'DELETE' OR old_key IS DISTINCT FROM new_key THEN
            INSERT INTO ferry_rows (tbl, pk, version, xid, deleted)
            VALUES (TG_TABLE_NAME, old_key, nextval('ferry_version_seq'), pg_current_xact_id(), true)
            ON CONFLICT (tbl, pk) DO UPDATE
                SET version = EXCLUDED.version, xid = EXCLUDED.xid, deleted = true;
        END IF;
    END IF;
    RETURN NULL;
END
$$;
