//! Conversions between protocol values, the JSON the capture triggers write, and SQLite values.
//!
//! The triggers record rows as JSON objects: integers and reals as numbers, text as strings,
//! bytes as (upper-case) hex strings, blob references as their JSON object. Keys are JSON arrays
//! built by SQLite's `json_array`; the client prints the common key shapes the same way in Rust
//! (a unit test pins the two together) and asks SQLite for the others.

use std::fmt::Write as _;

use ferry_protocol::{AsValueView, BlobRef, ColumnType, Key, Row, Table, Value, ValueView};
use rusqlite::types::{ToSql, ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{CachedStatement, Connection};
use serde::Deserialize as _;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;

use crate::db::quote;
use crate::error::{Error, Result};

/// Converts one JSON value from the log into a protocol value of the column's type. Values that
/// do not fit the type (SQLite lets an app store text in an integer column) keep their natural
/// kind; the server then answers `type_mismatch`.
pub fn json_to_value(ty: ColumnType, json: &Json) -> Result<Value> {
    Ok(match (ty, json) {
        (_, Json::Null) => Value::Null,
        (ColumnType::Real, Json::Number(n)) => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
        (ColumnType::Bytes, Json::String(s)) => {
            Value::Bytes(hex::decode(s).map_err(|e| Error::Corrupt(format!("bytes value {s:?}: {e}")))?)
        }
        (ColumnType::Blob, Json::String(s)) => match serde_json::from_str::<BlobRef>(s) {
            Ok(b) => Value::Blob(b),
            Err(_) => Value::Text(s.clone()),
        },
        (ColumnType::Blob, obj @ Json::Object(_)) => Value::Blob(
            serde_json::from_value::<BlobRef>(obj.clone()).map_err(|e| Error::Corrupt(format!("blob ref: {e}")))?,
        ),
        (_, Json::Number(n)) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        (_, Json::String(s)) => Value::Text(s.clone()),
        (_, Json::Bool(b)) => Value::Integer(*b as i64),
        (_, other) => Value::Text(other.to_string()),
    })
}

/// Converts a protocol value into the JSON form the triggers use.
pub fn value_to_json(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Integer(i) => Json::from(*i),
        Value::Real(r) => serde_json::Number::from_f64(*r).map(Json::Number).unwrap_or(Json::Null),
        Value::Text(t) => Json::String(t.clone()),
        Value::Bytes(b) => Json::String(hex::encode_upper(b)),
        Value::Blob(b) => serde_json::to_value(b).unwrap_or(Json::Null),
    }
}

/// Converts a protocol value into a SQLite value to bind (blob references as JSON text).
pub fn to_sql(value: &impl AsValueView) -> SqlValue {
    match value.view() {
        ValueView::Null => SqlValue::Null,
        ValueView::Integer(i) => SqlValue::Integer(i),
        ValueView::Real(r) => SqlValue::Real(r),
        ValueView::Text(t) => SqlValue::Text(t.to_string()),
        ValueView::Bytes(b) => SqlValue::Blob(b.to_vec()),
        ValueView::Blob(b) => SqlValue::Text(serde_json::to_string(&*b).unwrap_or_default()),
    }
}

/// Converts a SQLite value read back from a table into a protocol value (schema-less).
pub fn from_sql(value: SqlValue) -> Value {
    match value {
        SqlValue::Null => Value::Null,
        SqlValue::Integer(i) => Value::Integer(i),
        SqlValue::Real(r) => Value::Real(r),
        SqlValue::Text(t) => Value::Text(t),
        SqlValue::Blob(b) => Value::Bytes(b),
    }
}

/// Parses a row JSON object recorded by a trigger, typed by the table's columns.
///
/// Decodes straight into protocol values (no intermediate JSON tree for the common scalar
/// values); the result is exactly [`json_to_value`] of each member.
pub fn row_from_json(table: &Table, json: &str) -> Result<Row> {
    let mut de = serde_json::Deserializer::from_str(json);
    let row = RowSeed(table).deserialize(&mut de).and_then(|row| de.end().map(|()| row));
    row.map_err(|e| Error::Corrupt(format!("row json {json}: {e}")))
}

/// Decodes a row object, each member typed by its column (see [`row_from_json`]).
struct RowSeed<'t>(&'t Table);

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = Row;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Row, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = Row;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Row, A::Error> {
        let mut row = Row::new();
        while let Some(name) = map.next_key::<String>()? {
            let ty = self.0.column(&name).map(|c| c.ty).unwrap_or(ColumnType::Text);
            let value = map.next_value_seed(ValueSeed(ty))?;
            row.insert(name, value);
        }
        Ok(row)
    }
}

/// Decodes one JSON value as [`json_to_value`] does for a column of this type.
struct ValueSeed(ColumnType);

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl ValueSeed {
    /// The uncommon shapes (strings of bytes and blob columns, objects, arrays) go through
    /// [`json_to_value`] itself.
    fn convert<E: serde::de::Error>(&self, json: Json) -> Result<Value, E> {
        json_to_value(self.0, &json).map_err(E::custom)
    }
}

impl<'de> Visitor<'de> for ValueSeed {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Integer(b as i64))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(if self.0 == ColumnType::Real { Value::Real(i as f64) } else { Value::Integer(i) })
    }

    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(match i64::try_from(u) {
            Ok(i) if self.0 != ColumnType::Real => Value::Integer(i),
            _ => Value::Real(u as f64),
        })
    }

    fn visit_f64<E>(self, r: f64) -> Result<Value, E> {
        Ok(Value::Real(r))
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Value, E> {
        match self.0 {
            ColumnType::Bytes | ColumnType::Blob => self.convert(Json::String(s.to_string())),
            _ => Ok(Value::Text(s.to_string())),
        }
    }

    fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Value, E> {
        match self.0 {
            ColumnType::Bytes | ColumnType::Blob => self.convert(Json::String(s)),
            _ => Ok(Value::Text(s)),
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        let json = Json::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        self.convert(json)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        let json = Json::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
        self.convert(json)
    }
}

/// Parses a key JSON array recorded by a trigger, typed by the table's key columns.
pub fn key_from_json(table: &Table, json: &str) -> Result<Key> {
    let parsed: Vec<Json> = serde_json::from_str(json).map_err(|e| Error::Corrupt(format!("key json: {e}")))?;
    if parsed.len() != table.primary_key.len() {
        return Err(Error::Corrupt(format!("key {json} does not fit table {}", table.name)));
    }
    let mut out = Vec::with_capacity(parsed.len());
    for (name, v) in table.primary_key.iter().zip(&parsed) {
        let ty = table.column(name).map(|c| c.ty).unwrap_or(ColumnType::Text);
        out.push(json_to_value(ty, v)?);
    }
    Ok(Key(out))
}

/// The JSON text of a key exactly as the triggers write it (`json_array(...)` computed by SQLite,
/// bytes as upper-case hex), for comparisons with `ferry_log.pk`.
pub fn key_json(conn: &Connection, key: &Key) -> Result<String> {
    let mut out = String::new();
    push_key_json(conn, &key.0, &mut out)?;
    Ok(out)
}

/// Writes the key text of [`key_json`] into `out` (cleared first), reusing its allocation.
///
/// The common shapes (integers, bytes, texts that need no escaping) are printed in Rust exactly
/// as SQLite's `json_array` prints them; any other shape asks SQLite.
pub fn push_key_json<V: AsValueView>(conn: &Connection, key: &[V], out: &mut String) -> Result<()> {
    out.clear();
    let plain = |t: &str| t.chars().all(|c| c != '"' && c != '\\' && !c.is_control());
    let simple = key.iter().all(|v| match v.view() {
        ValueView::Integer(_) | ValueView::Bytes(_) => true,
        ValueView::Text(t) => plain(t),
        _ => false,
    });
    if simple {
        out.push('[');
        for (i, v) in key.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            match v.view() {
                ValueView::Integer(n) => {
                    let _ = write!(out, "{n}");
                }
                ValueView::Text(t) => {
                    out.push('"');
                    out.push_str(t);
                    out.push('"');
                }
                ValueView::Bytes(b) => {
                    out.push('"');
                    for byte in b {
                        let _ = write!(out, "{byte:02X}");
                    }
                    out.push('"');
                }
                // Excluded by `simple`.
                ValueView::Null | ValueView::Real(_) | ValueView::Blob(_) => {}
            }
        }
        out.push(']');
        return Ok(());
    }
    let placeholders = vec!["?"; key.len()].join(", ");
    let params: Vec<SqlValue> = key
        .iter()
        .map(|v| match v.view() {
            ValueView::Bytes(b) => SqlValue::Text(hex::encode_upper(b)),
            _ => to_sql(v),
        })
        .collect();
    let text: String = conn
        .prepare_cached(&format!("SELECT json_array({placeholders})"))?
        .query_row(rusqlite::params_from_iter(params), |r| r.get(0))?;
    out.push_str(&text);
    Ok(())
}

/// A protocol value (owned or a view) bound without copying it first (blob references as JSON
/// text, like [`to_sql`]).
pub struct SqlRef<'a, V: ?Sized = Value>(pub &'a V);

impl<V: AsValueView + ?Sized> ToSql for SqlRef<'_, V> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0.view() {
            ValueView::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            ValueView::Integer(i) => ToSqlOutput::Borrowed(ValueRef::Integer(i)),
            ValueView::Real(r) => ToSqlOutput::Borrowed(ValueRef::Real(r)),
            ValueView::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            ValueView::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            ValueView::Blob(b) => ToSqlOutput::Owned(SqlValue::Text(serde_json::to_string(&*b).unwrap_or_default())),
        })
    }
}

/// `"k1" = ? AND "k2" = ?` for the table's key columns, and the values to bind.
pub fn key_where(table: &Table, key: &Key) -> Result<(String, Vec<SqlValue>)> {
    if key.0.len() != table.primary_key.len() {
        return Err(Error::Corrupt(format!("key {key} does not fit table {}", table.name)));
    }
    Ok((key_clause(table), key.0.iter().map(to_sql).collect()))
}

/// `"k1" = ?1 AND "k2" = ?2` for the table's key columns.
pub fn key_clause(table: &Table) -> String {
    table
        .primary_key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} = ?{}", quote(k), i + 1))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Writes `row` into the table (insert, or update the given columns of the existing row).
/// Columns not in the schema are ignored. Capture must already be off (`applying = 1`).
pub fn upsert_row(conn: &Connection, table: &Table, row: &Row) -> Result<()> {
    let names: Vec<&str> = row.keys().map(String::as_str).collect();
    let values: Vec<&Value> = row.values().collect();
    Upsert::prepare(conn, table, &names)?.execute(&values)
}

/// At most this many parameters per statement (SQLite's historical minimum limit).
const MAX_PARAMS: usize = 999;
/// At most this many rows per multi-row statement.
const MAX_CHUNK: usize = 64;

/// An `INSERT … VALUES (…), (…), …` of rows of the same shape: one statement prepared for a chunk
/// of rows and one for a single row, so that writing N rows costs about N/chunk executions
/// (statement overhead, statement journal and capture-trigger frames are paid per execution).
pub struct RowWriter<'c> {
    conn: &'c Connection,
    /// `INSERT INTO t(a, b) VALUES ` (the value tuples follow).
    head: String,
    /// ` ON CONFLICT …` (after the value tuples).
    tail: String,
    /// Parameters per row.
    width: usize,
    /// Rows per execution of `many`.
    chunk: usize,
    one: Option<CachedStatement<'c>>,
    many: Option<CachedStatement<'c>>,
}

impl<'c> RowWriter<'c> {
    /// A writer of rows of `width` parameters each; statements are prepared on first use.
    pub fn new(conn: &'c Connection, head: String, tail: String, width: usize) -> Self {
        let chunk = (MAX_PARAMS / width.max(1)).clamp(1, MAX_CHUNK);
        RowWriter { conn, head, tail, width, chunk, one: None, many: None }
    }

    fn prepare(&self, rows: usize) -> Result<CachedStatement<'c>> {
        let tuple = format!("({})", vec!["?"; self.width].join(", "));
        let sql = format!("{}{}{}", self.head, vec![tuple; rows].join(", "), self.tail);
        Ok(self.conn.prepare_cached(&sql)?)
    }

    /// Writes `rows` in order; `bind(stmt, first, row)` binds one row's parameters at indexes
    /// `first..first + width`.
    pub fn write<T>(
        &mut self,
        rows: &[T],
        mut bind: impl FnMut(&mut CachedStatement<'c>, usize, &T) -> Result<()>,
    ) -> Result<()> {
        let full = if self.chunk > 1 { rows.len() / self.chunk * self.chunk } else { 0 };
        if full > 0 && self.many.is_none() {
            self.many = Some(self.prepare(self.chunk)?);
        }
        if full < rows.len() && self.one.is_none() {
            self.one = Some(self.prepare(1)?);
        }
        if let Some(stmt) = self.many.as_mut() {
            for chunk in rows[..full].chunks_exact(self.chunk) {
                for (i, row) in chunk.iter().enumerate() {
                    bind(stmt, i * self.width + 1, row)?;
                }
                stmt.raw_execute()?;
            }
        }
        if let Some(stmt) = self.one.as_mut() {
            for row in &rows[full..] {
                bind(stmt, 1, row)?;
                stmt.raw_execute()?;
            }
        }
        Ok(())
    }
}

/// The upsert of rows of one table that all carry the same columns: its SQL is built once and
/// each row's values are bound by position (see [`RowWriter`]). Columns not in the schema are
/// ignored. Capture must be off (`applying = 1`) while it runs.
pub struct Upsert<'c> {
    /// The column names given to [`Upsert::prepare`].
    columns: Vec<String>,
    /// The positions (in those columns) of the values to bind, in parameter order.
    bound: Vec<usize>,
    /// `None` when no column is in the schema (nothing to write).
    writer: Option<RowWriter<'c>>,
}

impl<'c> Upsert<'c> {
    /// The upsert of rows of `table` whose values come in the order of `columns`.
    pub fn prepare(conn: &'c Connection, table: &Table, columns: &[&str]) -> Result<Self> {
        let bound: Vec<usize> = (0..columns.len()).filter(|&i| table.column(columns[i]).is_some()).collect();
        let writer = (!bound.is_empty()).then(|| {
            let quoted: Vec<String> = bound.iter().map(|&i| quote(columns[i])).collect();
            let pk = table.primary_key.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
            let t = quote(&table.name);
            let updated: Vec<&String> = bound
                .iter()
                .zip(&quoted)
                .filter(|(i, _)| !table.primary_key.iter().any(|k| k == columns[**i]))
                .map(|(_, q)| q)
                .collect();
            // An existing row whose values are already these is left alone: no write, and no
            // update triggers fire for it.
            let conflict = if updated.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!(
                    "DO UPDATE SET {} WHERE {}",
                    updated.iter().map(|q| format!("{q} = excluded.{q}")).collect::<Vec<_>>().join(", "),
                    updated.iter().map(|q| format!("{t}.{q} IS NOT excluded.{q}")).collect::<Vec<_>>().join(" OR ")
                )
            };
            RowWriter::new(
                conn,
                format!("INSERT INTO {t}({}) VALUES ", quoted.join(", ")),
                format!(" ON CONFLICT({pk}) {conflict}"),
                bound.len(),
            )
        });
        Ok(Upsert { columns: columns.iter().map(|c| c.to_string()).collect(), bound, writer })
    }

    /// Whether this upsert was prepared for exactly these columns, in this order.
    pub fn has_columns(&self, columns: &[&str]) -> bool {
        self.columns.len() == columns.len() && self.columns.iter().zip(columns).all(|(a, b)| a == b)
    }

    /// Writes one row; `values` are in the order of the columns given to [`Upsert::prepare`].
    pub fn execute<V: AsValueView>(&mut self, values: &[V]) -> Result<()> {
        self.execute_rows(&[values])
    }

    /// Writes rows in order, each with its values in the order of the columns given to
    /// [`Upsert::prepare`]. A row written twice keeps its last values.
    pub fn execute_rows<R: AsRef<[V]>, V: AsValueView>(&mut self, rows: &[R]) -> Result<()> {
        let Some(writer) = self.writer.as_mut() else { return Ok(()) };
        let width = self.columns.len();
        if let Some(row) = rows.iter().find(|r| r.as_ref().len() != width) {
            return Err(Error::Corrupt(format!("a row has {} values for {width} columns", row.as_ref().len())));
        }
        let bound = &self.bound;
        writer.write(rows, |stmt, first, row| {
            let values = row.as_ref();
            for (param, &i) in bound.iter().enumerate() {
                stmt.raw_bind_parameter(first + param, SqlRef(&values[i]))?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod row_json_tests {
    use ferry_protocol::Schema;
    use proptest::prelude::*;

    use super::*;

    fn table() -> Table {
        let toml = r#"
            [[table]]
            name = "x"
            primary_key = ["id"]
            scope = "everyone"
            columns = [
              { name = "id", type = "integer", nullable = false },
              { name = "i", type = "integer" },
              { name = "r", type = "real" },
              { name = "t", type = "text" },
              { name = "b", type = "bytes" },
              { name = "blob", type = "blob" },
            ]
        "#;
        Schema::from_toml(toml).expect("schema").tables.remove(0)
    }

    /// The reference: a JSON tree, then [`json_to_value`] per member.
    fn by_tree(table: &Table, json: &str) -> Option<Row> {
        let Ok(Json::Object(map)) = serde_json::from_str::<Json>(json) else { return None };
        map.iter()
            .map(|(name, v)| {
                let ty = table.column(name).map(|c| c.ty).unwrap_or(ColumnType::Text);
                json_to_value(ty, v).ok().map(|v| (name.clone(), v))
            })
            .collect()
    }

    fn json_value() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(Json::from),
            any::<u64>().prop_map(Json::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Json::from),
            "[0-9A-Fa-f]{0,6}".prop_map(Json::String),
            ".{0,8}".prop_map(Json::String),
            Just(Json::String(r#"{"sha256":"ab","size":3,"media_type":"image/png"}"#.into())),
            Just(serde_json::json!({"sha256": "ab", "size": 3, "media_type": "image/png"})),
        ];
        leaf.prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Json::Array),
                prop::collection::btree_map("[a-z]{1,3}", inner, 0..3)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Decoding straight into values gives exactly what the JSON-tree path gives.
        #[test]
        fn direct_row_decoding_matches_the_json_tree(
            members in prop::collection::btree_map(
                prop_oneof![Just("id"), Just("i"), Just("r"), Just("t"), Just("b"), Just("blob"), Just("other")],
                json_value(),
                0..7,
            )
        ) {
            let table = table();
            let json = Json::Object(members.into_iter().map(|(k, v)| (k.to_string(), v)).collect()).to_string();
            prop_assert_eq!(row_from_json(&table, &json).ok(), by_tree(&table, &json), "{}", json);
        }
    }

    #[test]
    fn malformed_rows_are_corrupt() {
        let table = table();
        for json in ["[1]", "3", "{\"b\": \"zz\"}", "{\"i\": 1", "{} x"] {
            assert!(matches!(row_from_json(&table, json), Err(Error::Corrupt(_))), "{json}");
        }
    }
}

#[cfg(test)]
mod key_text_tests {
    use super::*;

    /// Keys built in Rust must print exactly as the capture triggers' `json_array` prints them.
    #[test]
    fn rust_key_text_matches_sqlite_json_array() {
        let conn = Connection::open_in_memory().expect("sqlite");
        let keys = [
            Key(vec![Value::Integer(5)]),
            Key(vec![Value::Integer(-12), Value::Text("a b".into())]),
            Key(vec![Value::Text("ünïcode ✓".into())]),
            Key(vec![Value::Integer(i64::MIN), Value::Integer(i64::MAX)]),
            Key(vec![Value::Text("needs \"escaping\"\n".into())]),
            Key(vec![Value::Bytes(vec![0, 0xab, 0xff]), Value::Integer(3)]),
            Key(vec![Value::Real(2.5), Value::Null]),
        ];
        let mut reused = String::from("left over");
        for key in keys {
            let ours = key_json(&conn, &key).expect("key text");
            push_key_json(&conn, &key.0, &mut reused).expect("key text");
            assert_eq!(ours, reused);
            // Bytes are keyed by their upper-case hex, as the triggers write them.
            let params: Vec<SqlValue> = key
                .0
                .iter()
                .map(|v| match v {
                    Value::Bytes(b) => SqlValue::Text(hex::encode_upper(b)),
                    other => to_sql(other),
                })
                .collect();
            let placeholders = vec!["?"; key.0.len()].join(", ");
            let sqlite: String = conn
                .query_row(&format!("SELECT json_array({placeholders})"), rusqlite::params_from_iter(params), |r| {
                    r.get(0)
                })
                .expect("json_array");
            assert_eq!(ours, sqlite, "{key:?}");
        }
    }
}
