//! Turning values, rows and events into text and JSON.

use ferry_client::PendingEvent;
use ferry_client::ferry_protocol::{ColumnType, Key, Row, Value};
use serde_json::{Value as Json, json};

/// A protocol value as plain JSON: numbers, strings, null; bytes as hex; blob references as objects.
pub fn value_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Integer(i) => json!(i),
        Value::Real(r) => json!(r),
        Value::Text(t) => json!(t),
        Value::Bytes(b) => json!(hex(b)),
        Value::Blob(b) => json!({ "sha256": b.sha256, "size": b.size, "media_type": b.media_type }),
    }
}

/// A row as a JSON object.
pub fn row_json(row: &Row) -> Json {
    Json::Object(row.iter().map(|(k, v)| (k.clone(), value_json(v))).collect())
}

/// A key as a JSON array.
pub fn key_json(key: &Key) -> Json {
    Json::Array(key.0.iter().map(value_json).collect())
}

/// A key as text: `-1`, or `(1, "a")` for composite keys.
pub fn key_text(key: &Key) -> String {
    match key.0.as_slice() {
        [one] => value_text(one),
        _ => key.to_string(),
    }
}

/// A protocol value as text for a terminal.
pub fn value_text(v: &Value) -> String {
    match v {
        Value::Text(t) => t.clone(),
        Value::Real(r) => format!("{r:?}"),
        other => other.to_string(),
    }
}

/// A row as `col=value, col=value`.
pub fn row_text(row: &Row) -> String {
    row.iter().map(|(k, v)| format!("{k}={}", value_text(v))).collect::<Vec<_>>().join(", ")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A local SQLite value as JSON.
pub fn sql_json(v: rusqlite::types::ValueRef<'_>) -> Json {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Json::Null,
        ValueRef::Integer(i) => json!(i),
        ValueRef::Real(r) => json!(r),
        ValueRef::Text(t) => json!(String::from_utf8_lossy(t)),
        ValueRef::Blob(b) => json!(hex(b)),
    }
}

/// A local SQLite value as text.
pub fn sql_text(v: rusqlite::types::ValueRef<'_>) -> String {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => "NULL".into(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(r) => format!("{r:?}"),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Blob(b) => format!("x'{}'", hex(b)),
    }
}

/// An aligned text table with a header line.
pub fn table(columns: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join(" | ").trim_end().to_string()
    };
    let mut out = line(columns) + "\n";
    out += &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-+-");
    out += "\n";
    for row in rows {
        out += &line(row);
        out += "\n";
    }
    out
}

/// A log event as JSON (failed or not).
pub fn event_json(e: &PendingEvent) -> Json {
    json!({
        "seq": e.seq,
        "tx": e.tx,
        "table": e.table,
        "op": e.op.as_str(),
        "key": key_json(&e.key),
        "values": row_json(&e.values),
        "status": e.status.as_str(),
        "code": e.failure_code.map(|c| c.as_str()),
        "message": e.failure_message,
        "column": e.failure_column,
        "server_row": e.server_row.as_ref().map(row_json),
    })
}

/// A failed event as a few lines of text.
pub fn failed_text(e: &PendingEvent) -> String {
    let code = e.failure_code.map(|c| c.as_str()).unwrap_or("unknown");
    let mut out = format!("  #{} {} {} {}: {}", e.seq, e.op.as_str(), e.table, key_text(&e.key), code);
    if let Some(col) = &e.failure_column {
        out += &format!(" (column {col})");
    }
    if let Some(msg) = &e.failure_message {
        out += &format!(": {msg}");
    }
    if !e.values.is_empty() {
        out += &format!("\n      values: {}", row_text(&e.values));
    }
    if let Some(row) = &e.server_row {
        out += &format!("\n      server row: {}", row_text(row));
    }
    out
}

/// Parses a `--set` value for a column of the given type; `null` is NULL.
pub fn parse_value(text: &str, ty: ColumnType) -> anyhow::Result<Value> {
    if text.eq_ignore_ascii_case("null") {
        return Ok(Value::Null);
    }
    Ok(match ty {
        ColumnType::Integer => Value::Integer(text.parse().map_err(|_| anyhow::anyhow!("{text:?} is not an integer"))?),
        ColumnType::Real => Value::Real(text.parse().map_err(|_| anyhow::anyhow!("{text:?} is not a number"))?),
        ColumnType::Text => Value::Text(text.to_string()),
        ColumnType::Bytes => {
            let digits = text.strip_prefix("x'").and_then(|t| t.strip_suffix('\'')).unwrap_or(text);
            if !digits.len().is_multiple_of(2) || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                anyhow::bail!("{text:?} is not hex bytes");
            }
            let bytes = (0..digits.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&digits[i..i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()?;
            Value::Bytes(bytes)
        }
        ColumnType::Blob => anyhow::bail!("blob columns cannot be set from the command line"),
    })
}

/// Unix seconds as an RFC 3339 UTC timestamp.
pub fn timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(timestamp(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn set_values_follow_the_column_type() {
        assert_eq!(parse_value("2", ColumnType::Integer).unwrap(), Value::Integer(2));
        assert_eq!(parse_value("2.5", ColumnType::Real).unwrap(), Value::Real(2.5));
        assert_eq!(parse_value("NULL", ColumnType::Text).unwrap(), Value::Null);
        assert_eq!(parse_value("x'00ff'", ColumnType::Bytes).unwrap(), Value::Bytes(vec![0, 255]));
        assert!(parse_value("two", ColumnType::Integer).is_err());
    }

    #[test]
    fn tables_are_aligned() {
        let t = table(&["id".into(), "name".into()], &[vec!["-1".into(), "Ada".into()]]);
        assert_eq!(t, "id | name\n---+-----\n-1 | Ada\n");
    }
}
