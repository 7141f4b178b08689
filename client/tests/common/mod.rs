//! Helpers shared by the client integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use ferry_client::ferry_protocol::{Key, Row, RowImage, Schema, Value};
use ferry_client::{Client, ClientConfig};

pub fn schema() -> Schema {
    Schema::from_toml(include_str!("../../../examples/sales.toml")).unwrap()
}

pub fn config(url: &str) -> ClientConfig {
    ClientConfig::new(url)
}

/// A client on a fresh database in `dir`, with the example schema installed.
pub fn client(dir: &tempfile::TempDir) -> Client {
    let c = Client::open(dir.path().join("device.db"), config("http://127.0.0.1:9")).unwrap();
    c.install_schema(&schema()).unwrap();
    c
}

pub fn row(pairs: &[(&str, Value)]) -> Row {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

pub fn text(s: &str) -> Value {
    Value::Text(s.into())
}

pub fn int(i: i64) -> Value {
    Value::Integer(i)
}

pub fn image(table: &str, key: i64, version: u64, values: Row) -> RowImage {
    RowImage { table: table.into(), key: Key::int(key), version, values }
}

/// Raw log rows: (seq, tx, kind, tbl, pk, new_row, changed, previous, base_version, status).
#[derive(Debug, Clone)]
pub struct LogRow {
    pub seq: i64,
    pub tx: Option<i64>,
    pub kind: String,
    pub tbl: Option<String>,
    pub pk: Option<String>,
    pub new_row: Option<serde_json::Value>,
    pub changed: Option<serde_json::Value>,
    pub previous: Option<serde_json::Value>,
    pub base_version: Option<i64>,
    pub status: String,
}

pub fn log(c: &Client) -> Vec<LogRow> {
    c.with_connection(|conn| {
        let mut stmt = conn.prepare(
            "SELECT seq, tx, kind, tbl, pk, new_row, changed, previous, base_version, status FROM ferry_log ORDER BY seq",
        )?;
        let json = |s: Option<String>| s.map(|s| serde_json::from_str::<serde_json::Value>(&s).unwrap());
        let rows = stmt
            .query_map([], |r| {
                Ok(LogRow {
                    seq: r.get(0)?,
                    tx: r.get(1)?,
                    kind: r.get(2)?,
                    tbl: r.get(3)?,
                    pk: r.get(4)?,
                    new_row: json(r.get(5)?),
                    changed: json(r.get(6)?),
                    previous: json(r.get(7)?),
                    base_version: r.get(8)?,
                    status: r.get(9)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    })
    .unwrap()
}

pub fn scalar_i64(c: &Client, sql: &str) -> Option<i64> {
    c.with_connection(|conn| Ok(conn.query_row(sql, [], |r| r.get::<_, Option<i64>>(0))?)).unwrap()
}

pub fn scalar_text(c: &Client, sql: &str) -> Option<String> {
    c.with_connection(|conn| Ok(conn.query_row(sql, [], |r| r.get::<_, Option<String>>(0))?)).unwrap()
}

/// Puts a product on the device the way the sync does (an image, not captured).
pub fn seed_product(c: &Client, id: i64, stock: i64) {
    use ferry_client::ferry_protocol::BatchResult;
    let values = row(&[("id", int(id)), ("name", text("widget")), ("price", Value::Real(2.5)), ("stock", int(stock))]);
    c.apply_result(&BatchResult {
        batch_seq: 0,
        outcomes: vec![],
        remaps: vec![],
        images: vec![image("product", id, 1, values)],
    })
    .unwrap();
}

/// The version the device last saw of `table`'s row `id` (single integer key).
pub fn row_version(c: &Client, table: &str, id: i64) -> Option<i64> {
    c.row_version(table, &Key::int(id)).unwrap().map(|v| v as i64)
}
