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

-- The change feed: the latest change of every synced row. `version` (from a sequence at write
-- time) identifies the change for conflict detection. `position` is the writing transaction's id:
-- readers serve only positions below the oldest transaction still in progress
-- (pg_snapshot_xmin), so a change that commits out of sequence order is never skipped (R11).
CREATE SEQUENCE ferry_version_seq;
CREATE TABLE ferry_rows (
    tbl      TEXT NOT NULL,
    pk       TEXT COLLATE "C" NOT NULL,
    version  BIGINT NOT NULL,
    position BIGINT NOT NULL,
    deleted  BOOLEAN NOT NULL DEFAULT false,
    changed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tbl, pk)
);
CREATE INDEX ferry_rows_by_position ON ferry_rows (tbl, position);

CREATE TABLE ferry_feed (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    horizon BIGINT NOT NULL
);
INSERT INTO ferry_feed (id, horizon) VALUES (1, 0);

CREATE TABLE ferry_apply_log (
    id        BIGSERIAL PRIMARY KEY,
    device_id TEXT NOT NULL,
    batch_seq BIGINT NOT NULL,
    event_seq BIGINT NOT NULL,
    tbl       TEXT NOT NULL,
    op        TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
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
        INSERT INTO ferry_rows (tbl, pk, version, position, deleted)
        VALUES (TG_TABLE_NAME, new_key, nextval('ferry_version_seq'), pg_current_xact_id()::text::bigint, false)
        ON CONFLICT (tbl, pk) DO UPDATE
            SET version = EXCLUDED.version, position = EXCLUDED.position, deleted = false, changed_at = now();
    END IF;
    IF TG_OP <> 'INSERT' THEN
        SELECT jsonb_agg(to_jsonb(OLD) -> c ORDER BY o)::text INTO old_key
        FROM unnest(TG_ARGV) WITH ORDINALITY AS k(c, o);
        IF TG_OP = 'DELETE' OR old_key IS DISTINCT FROM new_key THEN
            INSERT INTO ferry_rows (tbl, pk, version, position, deleted)
            VALUES (TG_TABLE_NAME, old_key, nextval('ferry_version_seq'), pg_current_xact_id()::text::bigint, true)
            ON CONFLICT (tbl, pk) DO UPDATE
                SET version = EXCLUDED.version, position = EXCLUDED.position, deleted = true, changed_at = now();
        END IF;
    END IF;
    RETURN NULL;
END
$$;
