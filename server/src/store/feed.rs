//! Change-feed SQL: which rows of a table a user's device must receive for a position range,
//! and whether each is in the user's scope. Built once for both dialects; executed by each
//! backend (`sqlite.rs`, `pg.rs`), which also decodes the rows.
//!
//! A receive reads, table by table (parents first), the *candidates* of a table:
//! - full receive (snapshot): every current row in scope, paged in primary-key order straight
//!   off the table's primary-key index (`(k1, k2…) > (after…) ORDER BY k1, k2… LIMIT n`), so a
//!   page costs its own rows, not the table;
//! - incremental receive over positions `[from, to)`: the rows whose feed entry lies in the range
//!   (tombstones included), plus — for tables scoped through a parent — the rows whose parent (or
//!   grand-parent…) changed in the range, because a parent moving in or out of scope moves them.
//!   These are paged in key-text order.
//!
//! Each candidate comes back with its current values (or none, if deleted) and an `in_scope`
//! flag; rows out of scope or deleted become removals (keys only, never values).

use ferry_protocol::{ColumnType, Key, Schema, Scope, Table, Value};

use super::{Backend, quote};

/// A bound parameter.
#[derive(Debug, Clone)]
pub enum Param {
    /// An integer.
    Int(i64),
    /// A text.
    Text(String),
}

/// A page query for a backend to run.
#[derive(Debug)]
pub struct PageQuery {
    /// The page query ([`FeedSql::page`]).
    pub sql: String,
    /// Its parameters.
    pub params: Vec<Param>,
    /// The query reading the rows' versions, where the page query leaves them at 0
    /// ([`scanned_versions`]; SQLite only).
    pub versions: Option<String>,
    /// The most rows the page may have.
    pub limit: usize,
    /// Value vectors to read the page's rows into.
    pub spare: SpareRows,
}

impl PageQuery {
    /// A vector for the page's rows, as many as [`PageQuery::limit`] (up to a bound: the limit
    /// is a ceiling, not a promise) without growing.
    pub fn rows(&self) -> Vec<FeedRow> {
        Vec::with_capacity(self.limit.min(MAX_RESERVED_ROWS))
    }
}

/// The most rows a page reserves room for before it reads them.
const MAX_RESERVED_ROWS: usize = 8192;

/// Value vectors of rows already sent, for the next rows read to be written into: a page stream
/// hands each page's rows back once the page is encoded (see `http::changes`), so the pages
/// after the first neither allocate nor free anything per row, texts included ([`put_text`]).
/// Each page is read on one thread and encoded on another: rows allocated by one and freed by
/// the other sent glibc's allocator down its slow paths on both.
#[derive(Debug, Default)]
pub struct SpareRows(Vec<Vec<Value>>);

/// The most rows [`SpareRows`] keeps: those of a couple of pages.
const MAX_SPARE_ROWS: usize = 2 * MAX_RESERVED_ROWS;

impl SpareRows {
    /// A vector for a row of `width` values: a spare one (its old values still in it, to be
    /// overwritten) or a new one.
    pub fn take(&mut self, width: usize) -> Vec<Value> {
        self.0.pop().unwrap_or_else(|| Vec::with_capacity(width))
    }

    /// Keeps `rows` for later pages, up to [`MAX_SPARE_ROWS`] in all.
    pub fn keep(&mut self, rows: impl IntoIterator<Item = Vec<Value>>) {
        let room = MAX_SPARE_ROWS.saturating_sub(self.0.len());
        self.0.extend(rows.into_iter().take(room));
    }

    /// How many vectors are kept.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Sets value `i` of `row` (a vector from [`SpareRows::take`], whose length says how many of
/// its values are still old ones) to `value`, reusing the old value's text buffer when both are
/// texts.
pub fn put_value(row: &mut Vec<Value>, i: usize, value: Value) {
    match row.get_mut(i) {
        Some(slot) => *slot = value,
        None => row.push(value),
    }
}

/// Sets value `i` of `row` (see [`put_value`]) to the text `text`, into the old value's buffer
/// when it held a text.
pub fn put_text(row: &mut Vec<Value>, i: usize, text: &str) {
    match row.get_mut(i) {
        Some(Value::Text(old)) => {
            old.clear();
            old.push_str(text);
        }
        Some(slot) => *slot = Value::Text(text.to_owned()),
        None => row.push(Value::Text(text.to_owned())),
    }
}

/// The user's claims, as scopes read them.
pub trait ClaimSource: Sync {
    /// The claim named `name` (`sub` is the user id), if the token carries it.
    fn claim(&self, name: &str) -> Option<Value>;
}

/// The range of a receive.
#[derive(Debug, Clone, Copy)]
pub struct FeedRange {
    /// Inclusive lower position (ignored for a full receive).
    pub from: i64,
    /// Exclusive upper position.
    pub to: i64,
    /// Full receive: every current row is a candidate.
    pub full: bool,
}

/// Builds feed SQL for one dialect, collecting the parameters in placeholder order.
pub struct FeedSql<'a> {
    backend: Backend,
    schema: &'a Schema,
    claims: &'a dyn ClaimSource,
    /// Parameters, bound as `?1…` (SQLite) or `$1…` (PostgreSQL).
    pub params: Vec<Param>,
}

impl<'a> FeedSql<'a> {
    /// A builder.
    pub fn new(backend: Backend, schema: &'a Schema, claims: &'a dyn ClaimSource) -> Self {
        FeedSql { backend, schema, claims, params: Vec::new() }
    }

    fn param(&mut self, p: Param) -> String {
        self.params.push(p);
        match self.backend {
            Backend::Sqlite => format!("?{}", self.params.len()),
            Backend::Postgres => format!("${}", self.params.len()),
        }
    }

    /// The key of alias `a` as the feed's key text (a JSON array, as the capture triggers print it).
    fn key_text(&self, alias: &str, table: &Table) -> String {
        let cols: Vec<_> = table.primary_key.iter().map(|c| format!("{alias}.{}", quote(c))).collect();
        match self.backend {
            Backend::Sqlite => format!("json_array({})", cols.join(", ")),
            Backend::Postgres => format!("({} COLLATE \"C\")", super::pg::key_text(table, &cols)),
        }
    }

    /// Element `i` of a key text, typed like the key column.
    fn key_part(&self, key_text: &str, i: usize, ty: ColumnType) -> String {
        match (self.backend, ty) {
            (Backend::Sqlite, _) => format!("json_extract({key_text}, '$[{i}]')"),
            (Backend::Postgres, ColumnType::Integer) => format!("(({key_text})::jsonb->>{i})::bigint"),
            (Backend::Postgres, _) => format!("(({key_text})::jsonb->>{i})"),
        }
    }

    fn false_sql(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "0",
            Backend::Postgres => "false",
        }
    }

    fn true_sql(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "1",
            Backend::Postgres => "true",
        }
    }

    /// Whether the row at alias `a` of `table` is in the user's scope (NULL when `a` is missing).
    pub fn in_scope(&mut self, table: &Table, alias: &str) -> String {
        let first_key = format!("{alias}.{}", quote(&table.primary_key[0]));
        match &table.scope {
            Scope::Everyone => format!("({first_key} IS NOT NULL)"),
            Scope::None => self.false_sql().to_string(),
            Scope::Claim { column, claim } => {
                let ty = table.column(column).map(|c| c.ty).unwrap_or(ColumnType::Text);
                let value = match (self.claims.claim(claim), ty) {
                    (Some(Value::Text(t)), ColumnType::Integer) => t.parse().ok().map(Param::Int),
                    (Some(Value::Integer(i)), ColumnType::Integer) => Some(Param::Int(i)),
                    (Some(Value::Text(t)), _) => Some(Param::Text(t)),
                    (Some(Value::Integer(i)), _) => Some(Param::Text(i.to_string())),
                    _ => None,
                };
                match value {
                    Some(v) => {
                        let p = self.param(v);
                        format!("({alias}.{} = {p})", quote(column))
                    }
                    None => self.false_sql().to_string(),
                }
            }
            Scope::Parent { column } => {
                let Some(parent) = table.foreign_key(column).and_then(|fk| self.schema.table(&fk.references)) else {
                    return self.false_sql().to_string();
                };
                let palias = format!("{alias}p");
                let inner = self.in_scope(parent, &palias);
                format!(
                    "({alias}.{} IN (SELECT {palias}.{} FROM {} {palias} WHERE {inner}))",
                    quote(column),
                    quote(&parent.primary_key[0]),
                    quote(&parent.name)
                )
            }
        }
    }

    /// Values of `table`'s (single) key for rows that changed in the range or whose parent chain did.
    fn affected_keys(&mut self, table: &Table, range: FeedRange, depth: usize) -> String {
        let ty = table.column(&table.primary_key[0]).map(|c| c.ty).unwrap_or(ColumnType::Integer);
        let from = self.param(Param::Int(range.from));
        let to = self.param(Param::Int(range.to));
        let mut sql = format!(
            "SELECT {} FROM ferry_rows WHERE tbl = '{}' AND position >= {from} AND position < {to}",
            self.key_part("pk", 0, ty),
            table.name
        );
        if let Some((column, parent)) = self.parent_of(table) {
            let alias = format!("a{depth}");
            let inner = self.affected_keys(parent, range, depth + 1);
            sql.push_str(&format!(
                " UNION SELECT {alias}.{} FROM {} {alias} WHERE {alias}.{} IN ({inner})",
                quote(&table.primary_key[0]),
                quote(&table.name),
                quote(&column)
            ));
        }
        sql
    }

    fn parent_of(&self, table: &Table) -> Option<(String, &'a Table)> {
        let Scope::Parent { column } = &table.scope else { return None };
        let parent = table.foreign_key(column).and_then(|fk| self.schema.table(&fk.references))?;
        Some((column.clone(), parent))
    }

    /// Key texts of the candidates of `table` for an incremental or catch-up range.
    fn candidates(&mut self, table: &Table, range: FeedRange) -> String {
        let from = self.param(Param::Int(range.from));
        let to = self.param(Param::Int(range.to));
        // SQLite would rather walk the whole table's entries in key order (to skip the sort) than
        // read the range by position and sort it: tell it which index costs the changes only.
        let (pk, rows) = match self.backend {
            Backend::Sqlite => ("pk", "ferry_rows INDEXED BY ferry_rows_by_position"),
            Backend::Postgres => ("pk COLLATE \"C\"", "ferry_rows"),
        };
        let mut sql = format!(
            "SELECT {pk} AS pk FROM {rows} WHERE tbl = '{}' AND position >= {from} AND position < {to}",
            table.name
        );
        if let Some((column, parent)) = self.parent_of(table) {
            let inner = self.affected_keys(parent, range, 0);
            sql.push_str(&format!(
                " UNION SELECT {} AS pk FROM {} c WHERE c.{} IN ({inner})",
                self.key_text("c", table),
                quote(&table.name),
                quote(&column)
            ));
        }
        sql
    }

    /// One page of candidates after key text `after` (empty: from the start): columns are `pk`,
    /// `version`, `in_scope`, then the table's columns in schema order (NULL when the row is gone).
    pub fn page(&mut self, table: &Table, range: FeedRange, after: &str, limit: i64) -> String {
        if range.full {
            return self.snapshot_page(table, after, limit);
        }
        let cand = self.candidates(table, range);
        let scope = self.in_scope(table, "t");
        let joins: Vec<_> = table
            .primary_key
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let ty = table.column(c).map(|c| c.ty).unwrap_or(ColumnType::Integer);
                format!("t.{} = {}", quote(c), self.key_part("c.pk", i, ty))
            })
            .collect();
        let columns: Vec<_> = table.columns.iter().map(|c| format!("t.{}", quote(&c.name))).collect();
        let after = self.param(Param::Text(after.to_string()));
        let limit = self.param(Param::Int(limit));
        let (order, cmp) = match self.backend {
            Backend::Sqlite => ("c.pk", format!("c.pk > {after}")),
            Backend::Postgres => ("c.pk COLLATE \"C\"", format!("c.pk COLLATE \"C\" > {after}")),
        };
        format!(
            "WITH c AS ({cand})
             SELECT c.pk, COALESCE(fr.version, 0), COALESCE({scope}, {f}), {cols}
             FROM c
             LEFT JOIN {t} t ON {joins}
             LEFT JOIN ferry_rows fr ON fr.tbl = '{name}' AND fr.pk = c.pk
             WHERE {cmp}
             ORDER BY {order}
             LIMIT {limit}",
            f = self.false_sql(),
            cols = columns.join(", "),
            t = quote(&table.name),
            joins = joins.join(" AND "),
            name = table.name,
        )
    }

    /// A snapshot page: rows in scope after the key `after`, in key order along the primary-key
    /// index. Every row is in scope; its version is one `ferry_rows` lookup, or, where
    /// [`merged_versions`] says so, the `ferry_rows` entry its key meets in a merge of both keys'
    /// indexes from `after` on, or, where [`scanned_versions`] says so, 0 here and read by that
    /// query.
    ///
    /// `after` is empty or a key [`key_params`] accepts (the cursor parser checks it); anything
    /// else would restart the table, which repeats rows (harmless in a snapshot) but skips none.
    fn snapshot_page(&mut self, table: &Table, after: &str, limit: i64) -> String {
        let scope = self.in_scope(table, "t");
        let keys: Vec<_> = table.primary_key.iter().map(|c| format!("t.{}", quote(c))).collect();
        let mut filter = scope;
        let mut lower = None;
        if let Some(params) = key_params(self.backend, table, after) {
            let bounds: Vec<_> = params.into_iter().map(|p| self.param(p)).collect();
            filter = match bounds.as_slice() {
                [one] => format!("{filter} AND {} > {one}", keys[0]),
                _ => format!("{filter} AND ({}) > ({})", keys.join(", "), bounds.join(", ")),
            };
            lower = bounds.into_iter().next();
        }
        let (join, version) = match merged_versions(self.backend, table) {
            // The rows' versions are read by a query of their own (see `PageQuery::versions`).
            _ if scanned_versions(self.backend, table).is_some() => (String::new(), "0".to_string()),
            Some(key) => {
                // The bound on both sides, so that each index scan starts at `after`.
                let bound = lower.map(|b| format!(" AND {key} > {b}")).unwrap_or_default();
                let join = format!(
                    " LEFT JOIN ferry_rows ferry_v ON ferry_v.tbl = '{}' AND {key} = {}{bound}",
                    table.name, keys[0]
                );
                (join, "ferry_v.version".to_string())
            }
            None => (String::new(), super::version_of(self.backend, table, "t")),
        };
        let limit = self.param(Param::Int(limit));
        let columns: Vec<_> = table.columns.iter().map(|c| format!("t.{}", quote(&c.name))).collect();
        // No key text per row: the page's position is the last row's key, which is among its
        // values (see `snapshot_key`).
        format!(
            "SELECT CAST(NULL AS TEXT),
                    COALESCE({version}, 0),
                    {yes}, {cols}
             FROM {t} t{join}
             WHERE {filter}
             ORDER BY {order}
             LIMIT {limit}",
            yes = self.true_sql(),
            cols = columns.join(", "),
            t = quote(&table.name),
            order = keys.join(", "),
        )
    }

    /// `SELECT EXISTS(…)`: whether the row of `table` with `key` exists and is in the user's scope.
    pub fn row_in_scope(&mut self, table: &Table, key: &ferry_protocol::Key) -> String {
        let scope = self.in_scope(table, "t");
        let conds: Vec<String> = table
            .primary_key
            .iter()
            .zip(&key.0)
            .map(|(c, v)| {
                let p = self.param(match v {
                    Value::Integer(i) => Param::Int(*i),
                    Value::Text(t) => Param::Text(t.clone()),
                    other => Param::Text(other.to_string()),
                });
                format!("t.{} = {p}", quote(c))
            })
            .collect();
        format!("SELECT EXISTS(SELECT 1 FROM {} t WHERE {} AND {scope})", quote(&table.name), conds.join(" AND "))
    }

    /// How many candidates the table has in the range.
    pub fn count(&mut self, table: &Table, range: FeedRange) -> String {
        if range.full {
            let scope = self.in_scope(table, "t");
            return format!("SELECT count(*) FROM {} t WHERE {scope}", quote(&table.name));
        }
        let cand = self.candidates(table, range);
        format!("SELECT count(*) FROM ({cand}) c")
    }
}

/// Whether a snapshot page of `table` reads its versions by walking `table`'s key index of
/// `ferry_rows` beside its rows, rather than looking each one up: for tables keyed by one integer
/// and sent to everyone, where the page's rows are a run of consecutive keys, a step through the
/// index per row costs less than a search. With a scope, the rows in scope may be sparse among
/// the `ferry_rows` entries the walk would read past, so each version is looked up.
fn walks_versions(table: &Table) -> bool {
    matches!(table.scope, Scope::Everyone)
}

/// For a snapshot page of `table`, the `ferry_rows` integer key column (alias `ferry_v`) to join
/// its rows with, where PostgreSQL walks the versions ([`walks_versions`]) in a merge of the two
/// indexes from the page's first key on (a 4000-row page: 1.9 ms; with the key parsed from its
/// text at each comparison, as before `int_key`, 3.3 ms).
fn merged_versions(backend: Backend, table: &Table) -> Option<String> {
    if backend != Backend::Postgres || !walks_versions(table) {
        return None;
    }
    super::pg::integer_key(table, "ferry_v")
}

/// For a snapshot page of `table`, the query that reads its rows' versions where SQLite walks
/// them ([`walks_versions`]): SQLite joins only by nested loops, a search per row, so the page
/// query leaves the version at 0 and this query reads the entries of keys `?1..=?2` (the page's
/// first and last key) in key order from `table`'s covering integer index of `ferry_rows`;
/// [`VersionMerge`] then pairs them with the rows (100k rows: 23 ms against 33 ms). Each row
/// is `(integer key, key text, version)`. Tombstones among the page's keys are read and skipped.
pub fn scanned_versions(backend: Backend, table: &Table) -> Option<String> {
    if backend != Backend::Sqlite || !walks_versions(table) {
        return None;
    }
    let key = super::sqlite::integer_key(table, "pk")?;
    Some(format!(
        "SELECT {key}, pk, version FROM ferry_rows INDEXED BY {index} \
         WHERE tbl = '{name}' AND {key} BETWEEN ?1 AND ?2 ORDER BY {key}",
        index = super::sqlite::integer_key_index_name(table),
        name = table.name,
    ))
}

/// Gives the rows of a snapshot page (in key order) the versions read by [`scanned_versions`]
/// (in key order too), one entry at a time: a row's version is that of the entry whose integer
/// key is the row's key and whose key text is the row's own (`[7]`; another entry's text may read
/// as the same integer). A row without such an entry keeps version 0.
pub struct VersionMerge<'r> {
    rows: std::iter::Peekable<std::slice::IterMut<'r, FeedRow>>,
    /// Where the key is among a row's values.
    at: usize,
    /// The first and the last row's key: the range of entries to read.
    pub keys: Option<(i64, i64)>,
}

/// The integer key of a row whose key is value `at`.
fn integer_key_of(row: &FeedRow, at: usize) -> Option<i64> {
    match row.values.as_ref().and_then(|v| v.get(at)) {
        Some(Value::Integer(i)) => Some(*i),
        _ => None,
    }
}

impl<'r> VersionMerge<'r> {
    /// A merge into `rows` of `table`; `None` if `table` has no key column.
    pub fn new(table: &Table, rows: &'r mut [FeedRow]) -> Option<Self> {
        let at = table.primary_key.first().and_then(|k| table.columns.iter().position(|c| &c.name == k))?;
        let first = rows.iter().find_map(|row| integer_key_of(row, at));
        let last = rows.iter().rev().find_map(|row| integer_key_of(row, at));
        let keys = first.zip(last);
        Some(VersionMerge { rows: rows.iter_mut().peekable(), at, keys })
    }

    /// Takes the next entry; `false` once no row is left for later entries.
    pub fn entry(&mut self, key: i64, pk: &str, version: u64) -> bool {
        let at = self.at;
        // Rows before this entry's key have no entry left: they keep 0.
        while self.rows.next_if(|row| integer_key_of(row, at).is_none_or(|k| k < key)).is_some() {}
        let Some(row) = self.rows.peek_mut() else { return false };
        if integer_key_of(row, at) == Some(key) && is_integer_key_text(pk, key) {
            row.version = version;
        }
        true
    }
}

/// Whether `text` is the key text of integer key `key`: `[key]` as JSON prints it, with no sign
/// but a minus and no leading zeros.
fn is_integer_key_text(text: &str, key: i64) -> bool {
    let Some(digits) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) else { return false };
    let (negative, digits) = match digits.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, digits),
    };
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && !(negative && digits == "0");
    // Parsed as the magnitude (i64::MIN's has no positive i64), then compared with the key's.
    canonical && negative == (key < 0) && digits.parse::<u64>() == Ok(key.unsigned_abs())
}

/// Parses a feed key text (a JSON array of integers and texts) into a key with one value per key
/// column of `table`.
pub fn parse_key(table: &Table, text: &str) -> Option<Key> {
    let items: Vec<serde_json::Value> = serde_json::from_str(text).ok()?;
    let values = items
        .into_iter()
        .map(|item| match item {
            serde_json::Value::Number(n) => n.as_i64().map(Value::Integer),
            serde_json::Value::String(s) => Some(Value::Text(s)),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    (values.len() == table.primary_key.len()).then_some(Key(values))
}

/// The snapshot position after a row of `table` with these `values` (schema column order): its
/// key as a key text [`parse_key`] reads, or `None` if a key value is not an integer or a text.
pub fn snapshot_key(table: &Table, values: &[Value]) -> Option<String> {
    let items = table
        .primary_key
        .iter()
        .map(|k| match table.columns.iter().position(|c| &c.name == k).and_then(|i| values.get(i)) {
            Some(Value::Integer(i)) => Some(serde_json::Value::from(*i)),
            Some(Value::Text(t)) => Some(serde_json::Value::from(t.as_str())),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(serde_json::Value::Array(items).to_string())
}

/// The bound values of a snapshot position (a key text), or `None` when `text` is empty or not a
/// key of `table`. PostgreSQL needs each value typed like its key column; SQLite compares values
/// of mixed types in its own total order, the same order as `ORDER BY`, so any key it produced
/// binds as it is.
pub fn key_params(backend: Backend, table: &Table, text: &str) -> Option<Vec<Param>> {
    let key = parse_key(table, text)?;
    key.0
        .into_iter()
        .zip(&table.primary_key)
        .map(|(value, column)| {
            let ty = table.column(column).map(|c| c.ty);
            match (value, backend, ty) {
                (Value::Integer(i), Backend::Sqlite, _) | (Value::Integer(i), _, Some(ColumnType::Integer)) => {
                    Some(Param::Int(i))
                }
                (Value::Text(t), Backend::Sqlite, _) | (Value::Text(t), _, Some(ColumnType::Text)) => {
                    Some(Param::Text(t))
                }
                _ => None,
            }
        })
        .collect()
}

/// One candidate row of a page.
#[derive(Debug, Clone)]
pub struct FeedRow {
    /// The key as feed key text (JSON array); `None` in a snapshot, whose rows are all in scope
    /// and carry their key among their values ([`snapshot_key`]).
    pub pk: Option<String>,
    /// The row's version (0 when unknown).
    pub version: u64,
    /// The row's values in schema column order, or `None` when it is deleted or out of scope.
    pub values: Option<Vec<Value>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_key_texts_are_only_those_json_prints() {
        for (text, key) in [("[7]", 7), ("[0]", 0), ("[-12]", -12), ("[9223372036854775807]", i64::MAX)] {
            assert!(is_integer_key_text(text, key), "{text}");
        }
        assert!(is_integer_key_text("[-9223372036854775808]", i64::MIN));
        for (text, key) in [
            ("[07]", 7),
            ("[+7]", 7),
            ("[-0]", 0),
            ("[7", 7),
            ("7", 7),
            ("[7.0]", 7),
            ("[]", 0),
            ("[8]", 7),
            ("[-7]", 7),
        ] {
            assert!(!is_integer_key_text(text, key), "{text} is not the key text of {key}");
        }
        assert!(!is_integer_key_text("[\"7\"]", 7));
    }

    /// A spare row's texts are overwritten in their own buffers, and its other values replaced.
    #[test]
    fn spare_rows_are_read_into_in_place() {
        let mut spare = SpareRows::default();
        spare.keep([vec![Value::Integer(1), Value::Text(String::with_capacity(64)), Value::Null]]);
        let mut row = spare.take(2);
        assert!(spare.is_empty());
        let Value::Text(old) = &row[1] else { panic!("a text") };
        let buffer = old.as_ptr();
        put_value(&mut row, 0, Value::Integer(2));
        put_text(&mut row, 1, "new text");
        row.truncate(2);
        assert_eq!(row, vec![Value::Integer(2), Value::Text("new text".into())]);
        let Value::Text(new) = &row[1] else { panic!("a text") };
        assert_eq!(new.as_ptr(), buffer, "the text went into the old buffer");

        let mut fresh = spare.take(2);
        put_text(&mut fresh, 0, "a");
        put_value(&mut fresh, 1, Value::Null);
        assert_eq!(fresh, vec![Value::Text("a".into()), Value::Null]);
    }

    #[test]
    fn spare_rows_keep_at_most_a_couple_of_pages() {
        let mut spare = SpareRows::default();
        spare.keep((0..MAX_SPARE_ROWS + 10).map(|_| Vec::new()));
        spare.keep([Vec::new()]);
        assert_eq!(spare.len(), MAX_SPARE_ROWS);
    }
}
