-- The integer of every feed entry whose key text is one integer (`[5]` → 5), NULL for the rest,
-- kept by PostgreSQL itself on every write, so no writer of `ferry_rows` can leave it out.
-- Snapshot pages merge with `ferry_rows` on it, and version lookups search it, through a partial
-- index per table keyed by one integer (`ferry_rows_int_key_<table>`, made at schema install):
-- comparing a stored integer costs far less than parsing the key text of every entry met
-- (docs/decisions.md). The expression never fails a write: a text that is not an integer's, or
-- an integer's too large for a bigint, gets NULL. It checks the shape with `translate` and the
-- range by comparing texts (in the column's "C" collation), at ~0.7 µs per write; a regular
-- expression and a cast to numeric cost ~2.2 µs.
ALTER TABLE ferry_rows ADD COLUMN int_key BIGINT GENERATED ALWAYS AS (
    CASE WHEN left(pk, 1) = '[' AND right(pk, 1) = ']' THEN
        CASE translate(substr(pk, 2, length(pk) - 2), '0123456789', '')
            WHEN '' THEN
                CASE WHEN length(pk) BETWEEN 3 AND 20
                       OR (length(pk) = 21 AND substr(pk, 2, 19) <= '9223372036854775807')
                    THEN substr(pk, 2, length(pk) - 2)::bigint END
            WHEN '-' THEN
                CASE WHEN left(pk, 2) = '[-' AND (length(pk) BETWEEN 4 AND 21
                       OR (length(pk) = 22 AND substr(pk, 3, 19) <= '9223372036854775808'))
                    THEN substr(pk, 2, length(pk) - 2)::bigint END
        END
    END
) STORED;
