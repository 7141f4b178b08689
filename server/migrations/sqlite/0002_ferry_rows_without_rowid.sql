-- ferry_rows becomes a WITHOUT ROWID table keyed by (tbl, pk): a row's feed entry is then one
-- B-tree search (every snapshot page looks one up per row, for its version) and each change
-- writes one B-tree fewer (no separate rowid table behind the key index).
--
-- The capture triggers on the app tables name ferry_rows and keep working on the new table;
-- legacy_alter_table keeps the rename from checking them while the old table is gone.
PRAGMA legacy_alter_table = ON;

CREATE TABLE ferry_rows_keyed (
    tbl      TEXT NOT NULL,
    pk       TEXT NOT NULL,
    version  INTEGER NOT NULL,
    position INTEGER NOT NULL,
    deleted  INTEGER NOT NULL DEFAULT 0,
    -- Unix seconds of the change; compaction drops tombstones older than the retention.
    changed_at INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tbl, pk)
) WITHOUT ROWID;

INSERT INTO ferry_rows_keyed (tbl, pk, version, position, deleted, changed_at)
    SELECT tbl, pk, version, position, deleted, changed_at FROM ferry_rows;

DROP TABLE ferry_rows;
ALTER TABLE ferry_rows_keyed RENAME TO ferry_rows;
CREATE INDEX ferry_rows_by_position ON ferry_rows (tbl, position);

PRAGMA legacy_alter_table = OFF;
