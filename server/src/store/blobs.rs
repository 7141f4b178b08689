//! Blob SQL (R14, R15): is a blob referenced by a row in the user's scope?
//!
//! Blob columns hold the reference as JSON text (`{"sha256":"…","size":…,"media_type":"…"}`,
//! written by the backends' `bind`), so a reference is found with `LIKE '%"sha256":"<hex>"%'`.
//! The address is validated (64 lower-case hex digits) before it is put in the SQL text; scope
//! predicates come from [`FeedSql::in_scope`] with bound claim parameters. Each query scans the
//! tables with blob columns; an index table of references is the way to scale this.

use ferry_protocol::{ColumnType, Schema};

use crate::store::Store;
use crate::store::StoreError;
use crate::store::feed::{ClaimSource, FeedSql, Param};
use crate::store::quote;

/// Whether a row the user may receive references blob `sha256` in one of its blob columns.
pub async fn referenced_in_scope(
    store: &Store,
    schema: &Schema,
    claims: &dyn ClaimSource,
    sha256: &str,
) -> Result<bool, StoreError> {
    referenced(store, schema, Some(claims), sha256).await
}

/// Whether any row (in the scope of `claims`, when given) references blob `sha256`.
pub async fn referenced(
    store: &Store,
    schema: &Schema,
    claims: Option<&dyn ClaimSource>,
    sha256: &str,
) -> Result<bool, StoreError> {
    if !crate::blobs::is_address(sha256) {
        return Ok(false);
    }
    let pattern = format!("'%\"sha256\":\"{sha256}\"%'");
    for table in &schema.tables {
        let refs: Vec<String> = table
            .columns
            .iter()
            .filter(|c| c.ty == ColumnType::Blob)
            .map(|c| format!("a.{} LIKE {pattern}", quote(&c.name)))
            .collect();
        if refs.is_empty() {
            continue;
        }
        let (scope, params) = match claims {
            Some(claims) => {
                let mut sql = FeedSql::new(store.backend(), schema, claims);
                let scope = sql.in_scope(table, "a");
                (scope, sql.params)
            }
            None => ("1 = 1".to_string(), Vec::new()),
        };
        let text = format!("SELECT count(*) FROM {} a WHERE ({}) AND {scope}", quote(&table.name), refs.join(" OR "));
        let text = sqlx::AssertSqlSafe(text);
        let n: i64 = match store {
            Store::Sqlite(s) => {
                let mut q = sqlx::query_scalar::<_, i64>(text);
                for p in params {
                    q = match p {
                        Param::Int(i) => q.bind(i),
                        Param::Text(t) => q.bind(t),
                    };
                }
                q.fetch_one(&s.pool).await?
            }
            Store::Postgres(pg) => {
                let mut q = sqlx::query_scalar::<_, i64>(text);
                for p in params {
                    q = match p {
                        Param::Int(i) => q.bind(i),
                        Param::Text(t) => q.bind(t),
                    };
                }
                q.fetch_one(&pg.pool).await?
            }
        };
        if n > 0 {
            return Ok(true);
        }
    }
    Ok(false)
}
