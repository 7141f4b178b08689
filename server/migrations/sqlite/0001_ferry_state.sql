-- Ferry's own bookkeeping on the embedded SQLite backend. App tables are created from the schema.

-- One row per device: who owns it, which batch comes next, and the stored result of the last one.
CREATE TABLE ferry_devices (
    device_id      TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL,
    next_batch_seq INTEGER NOT NULL DEFAULT 1,
    last_digest    BLOB,
    last_result    BLOB,
    created_at     TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    last_seen_at   TEXT
);

-- Durable per-device map of temporary keys to the real keys the server assigned (R4).
CREATE TABLE ferry_key_map (
    device_id TEXT NOT NULL,
    tbl       TEXT NOT NULL,
    temporary INTEGER NOT NULL,
    real      INTEGER NOT NULL,
    PRIMARY KEY (device_id, tbl, temporary)
);

-- The change feed: the latest change of every synced row. `version` identifies the change (devices
-- send it back for conflict detection); `position` orders the feed for readers (on SQLite, one
-- writer at a time, it equals the version). Deletes leave tombstones (deleted = 1).
-- Maintained by triggers on the app tables.
CREATE TABLE ferry_rows (
    tbl      TEXT NOT NULL,
    pk       TEXT NOT NULL,
    version  INTEGER NOT NULL,
    position INTEGER NOT NULL,
    deleted  INTEGER NOT NULL DEFAULT 0,
    -- Unix seconds of the change; compaction drops tombstones older than the retention.
    changed_at INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tbl, pk)
);
CREATE INDEX ferry_rows_by_position ON ferry_rows (tbl, position);

-- Tombstones below the horizon have been compacted away: older cursors must receive in full.
CREATE TABLE ferry_feed (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    horizon INTEGER NOT NULL
);
INSERT INTO ferry_feed (id, horizon) VALUES (1, 0);

-- The version counter (SQLite has one writer at a time, so commit order equals version order).
CREATE TABLE ferry_counter (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO ferry_counter (id, version) VALUES (1, 0);

-- Every event the apply engine applied: evidence for exactly-once and ordering checks.
CREATE TABLE ferry_apply_log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    batch_seq INTEGER NOT NULL,
    event_seq INTEGER NOT NULL,
    tbl       TEXT NOT NULL,
    op        TEXT NOT NULL,
    applied_at INTEGER NOT NULL DEFAULT (strftime('%s', 'now'))
);

-- Every schema the server has served, so events recorded under an older one can be judged (R17).
CREATE TABLE ferry_schemas (
    version   TEXT PRIMARY KEY,
    schema    TEXT NOT NULL,
    served_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
