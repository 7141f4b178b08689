-- Ferry's own text keys compare bytewise. Table names and device ids are matched for equality
-- only, but every B-tree search over them compared through the database's collation
-- (`strcoll`, unless the database's collation is "C"): in `ferry_rows`' primary key and position
-- index, the key map's and the devices' primary keys. Changing a column's collation rebuilds
-- its indexes, not its table.
ALTER TABLE ferry_rows ALTER COLUMN tbl TYPE TEXT COLLATE "C";
ALTER TABLE ferry_key_map ALTER COLUMN device_id TYPE TEXT COLLATE "C", ALTER COLUMN tbl TYPE TEXT COLLATE "C";
ALTER TABLE ferry_devices ALTER COLUMN device_id TYPE TEXT COLLATE "C";

-- `int_key` (migration 0002) is now written by its writers, the capture triggers and the
-- backfill at schema install, which know whether a table is keyed by one integer and have the
-- integer at hand: the generated expression parsed every key text, on every write and again
-- on every upsert. The values already stored stay.
ALTER TABLE ferry_rows ALTER COLUMN int_key DROP EXPRESSION;
