//! Conversions between protocol values, the JSON the capture triggers write, and SQLite values.
//!
//! The triggers record rows as JSON objects: integers and reals as numbers, text as strings,
//! bytes as (upper-case) hex strings, blob references as their JSON object. Keys are JSON arrays
//! built by SQLite's `json_array`, so key text is always produced by SQLite itself.

use ferry_protocol::{BlobRef, ColumnType, Key, Row, Table, Value};
use rusqlite::Connection;
use rusqlite::types::Value as SqlValue;
use serde_json::Value as Json;

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
pub fn to_sql(value: &Value) -> SqlValue {
    match value {
        Value::Null => SqlValue::Null,
        Value::Integer(i) => SqlValue::Integer(*i),
        Value::Real(r) => SqlValue::Real(*r),
        Value::Text(t) => SqlValue::Text(t.clone()),
        Value::Bytes(b) => SqlValue::Blob(b.clone()),
        Value::Blob(b) => SqlValue::Text(serde_json::to_string(b).unwrap_or_default()),
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
pub fn row_from_json(table: &Table, json: &str) -> Result<Row> {
    let parsed: Json = serde_json::from_str(json).map_err(|e| Error::Corrupt(format!("row json: {e}")))?;
    let Json::Object(map) = parsed else { return Err(Error::Corrupt(format!("row json is not an object: {json}"))) };
    let mut row = Row::new();
    for (name, v) in &map {
        let ty = table.column(name).map(|c| c.ty).unwrap_or(ColumnType::Text);
        row.insert(name.clone(), json_to_value(ty, v)?);
    }
    Ok(row)
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
/// bytes as upper-case hex), for comparisons with `ferry_log.pk` and `ferry_versions.pk`.
pub fn key_json(conn: &Connection, key: &Key) -> Result<String> {
    // The common shapes need no round trip to SQLite: integers, and texts that need no escaping
    // print the same as SQLite's json_array prints them.
    let plain = |t: &str| t.chars().all(|c| c != '"' && c != '\\' && !c.is_control());
    if key.0.iter().all(|v| matches!(v, Value::Integer(_)) || matches!(v, Value::Text(t) if plain(t))) {
        let items: Vec<String> = key
            .0
            .iter()
            .map(|v| match v {
                Value::Text(t) => format!("\"{t}\""),
                other => other.to_string(),
            })
            .collect();
        return Ok(format!("[{}]", items.join(",")));
    }
    let placeholders = vec!["?"; key.0.len()].join(", ");
    let params: Vec<SqlValue> = key
        .0
        .iter()
        .map(|v| match v {
            Value::Bytes(b) => SqlValue::Text(hex::encode_upper(b)),
            other => to_sql(other),
        })
        .collect();
    Ok(conn
        .query_row(&format!("SELECT json_array({placeholders})"), rusqlite::params_from_iter(params), |r| r.get(0))?)
}

/// `"k1" = ? AND "k2" = ?` for the table's key columns, and the values to bind.
pub fn key_where(table: &Table, key: &Key) -> Result<(String, Vec<SqlValue>)> {
    if key.0.len() != table.primary_key.len() {
        return Err(Error::Corrupt(format!("key {key} does not fit table {}", table.name)));
    }
    let clause = table
        .primary_key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} = ?{}", crate::db::quote(k), i + 1))
        .collect::<Vec<_>>()
        .join(" AND ");
    Ok((clause, key.0.iter().map(to_sql).collect()))
}

/// Writes `row` into the table (insert, or update the given columns of the existing row).
/// Columns not in the schema are ignored. Capture must already be off (`applying = 1`).
pub fn upsert_row(conn: &Connection, table: &Table, row: &Row) -> Result<()> {
    let cols: Vec<(&String, &Value)> = row.iter().filter(|(c, _)| table.column(c).is_some()).collect();
    if cols.is_empty() {
        return Ok(());
    }
    let names = cols.iter().map(|(c, _)| crate::db::quote(c)).collect::<Vec<_>>().join(", ");
    let placeholders = (1..=cols.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
    let pk = table.primary_key.iter().map(|c| crate::db::quote(c)).collect::<Vec<_>>().join(", ");
    let updates = cols
        .iter()
        .filter(|(c, _)| !table.primary_key.contains(c))
        .map(|(c, _)| format!("{0} = excluded.{0}", crate::db::quote(c)))
        .collect::<Vec<_>>();
    let conflict =
        if updates.is_empty() { "DO NOTHING".to_string() } else { format!("DO UPDATE SET {}", updates.join(", ")) };
    let sql = format!(
        "INSERT INTO {}({names}) VALUES ({placeholders}) ON CONFLICT({pk}) {conflict}",
        crate::db::quote(&table.name)
    );
    // The statement text is the same for every row of a table: prepare it once per connection.
    conn.prepare_cached(&sql)?.execute(rusqlite::params_from_iter(cols.iter().map(|(_, v)| to_sql(v))))?;
    Ok(())
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
        ];
        for key in keys {
            let ours = key_json(&conn, &key).expect("key text");
            let params: Vec<SqlValue> = key.0.iter().map(to_sql).collect();
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
