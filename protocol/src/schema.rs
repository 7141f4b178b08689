//! The schema the server serves to devices: synced tables, their columns and keys, foreign keys,
//! who receives which rows (scope), what devices may write (access) and how conflicts resolve.
//!
//! The schema is written once as TOML by the app's developer and validated by [`Schema::new`],
//! which refuses anything the sync could not keep consistent (for example a scope that could give
//! a device a child row without its parent). Identifiers in SQL only ever come from a validated
//! schema.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A validated schema with its version digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schema {
    /// Hex sha256 of the tables' canonical (postcard) encoding. Devices send it with every batch.
    pub version: String,
    /// The synced tables, parents before children.
    pub tables: Vec<Table>,
}

/// One synced table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    /// Table name (letters, digits, `_`; not starting with `ferry_`).
    pub name: String,
    /// Columns, in order.
    pub columns: Vec<Column>,
    /// Names of the primary-key columns (one for simple keys, several for composite keys).
    pub primary_key: Vec<String>,
    /// Whether the server assigns the key (single integer key). Devices insert with temporary
    /// negative keys and receive the real key in the batch result.
    #[serde(default)]
    pub auto_number: bool,
    /// Foreign keys: a column holding the primary key of a row of an earlier table.
    #[serde(default)]
    pub foreign_keys: Vec<ForeignKey>,
    /// What happens when an update or delete was based on an outdated row version.
    #[serde(default)]
    pub conflict: ConflictPolicy,
    /// Which rows each user's devices receive.
    #[serde(default)]
    pub scope: Scope,
    /// Which operations devices may send.
    #[serde(default)]
    pub access: Access,
}

/// One column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Portable type.
    #[serde(rename = "type")]
    pub ty: ColumnType,
    /// Whether NULL is allowed (key columns never are).
    #[serde(default = "yes")]
    pub nullable: bool,
}

fn yes() -> bool {
    true
}

/// Portable column types, mapped to each database's native type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    /// 64-bit signed integer (`BIGINT` / `INTEGER`).
    Integer,
    /// 64-bit float (`DOUBLE PRECISION` / `REAL`).
    Real,
    /// UTF-8 text.
    Text,
    /// Raw bytes (`BYTEA` / `BLOB`).
    Bytes,
    /// A blob reference ([`crate::BlobRef`]), stored as JSON text.
    Blob,
}

impl ColumnType {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnType::Integer => "integer",
            ColumnType::Real => "real",
            ColumnType::Text => "text",
            ColumnType::Bytes => "bytes",
            ColumnType::Blob => "blob",
        }
    }
}

/// A foreign key from `column` to the primary key of `references`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForeignKey {
    /// The referencing column in this table.
    pub column: String,
    /// The referenced table (must have a single-column primary key and be listed earlier).
    pub references: String,
}

/// Conflict policy for updates and deletes based on an outdated row version (R13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// The event fails with code `conflict` and carries the server's row.
    #[default]
    Reject,
    /// The event is dropped (reported applied); the server's row stays and comes back on receive.
    ServerWins,
    /// The event is applied over the server's row.
    ClientWins,
    /// Only the columns changed on the device are written, and only if the server did not
    /// change them too since the device's version; otherwise the event fails with `conflict`.
    Merge,
}

/// Which rows of a table each user's devices receive (R8).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every user receives every row.
    #[default]
    Everyone,
    /// Rows whose `column` equals the user's claim named `claim` (e.g. `sub`, the user id).
    Claim {
        /// The column compared.
        column: String,
        /// The token claim it must equal.
        claim: String,
    },
    /// Rows whose parent, through the foreign key in `column`, is in the user's scope.
    Parent {
        /// The foreign-key column leading to the parent.
        column: String,
    },
    /// Write-only: devices send rows and receive none (e.g. location pings).
    None,
}

/// Which operations devices may send for a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// Devices may insert rows.
    #[serde(default = "yes")]
    pub insert: bool,
    /// Devices may update rows.
    #[serde(default = "yes")]
    pub update: bool,
    /// Devices may delete rows.
    #[serde(default = "yes")]
    pub delete: bool,
}

impl Default for Access {
    fn default() -> Self {
        Access { insert: true, update: true, delete: true }
    }
}

/// Why a schema was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// The TOML could not be parsed into tables.
    #[error("schema file: {0}")]
    Parse(String),
    /// A name is not a plain identifier, or is reserved.
    #[error(
        "invalid identifier {0:?}: use letters, digits and '_', start with a letter or '_', at most 63 characters, not starting with 'ferry_'"
    )]
    InvalidIdentifier(String),
    /// The schema has no tables.
    #[error("the schema declares no tables")]
    Empty,
    /// Two tables share a name.
    #[error("table {0:?} is declared twice")]
    DuplicateTable(String),
    /// Two columns of a table share a name.
    #[error("table {table:?}: column {column:?} is declared twice")]
    DuplicateColumn {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// A table rule is inconsistent; the message says how.
    #[error("table {table:?}: {problem}")]
    Table {
        /// The table.
        table: String,
        /// What is wrong.
        problem: String,
    },
}

/// The shape of a schema file: `[[table]]` entries. Other top-level keys belong to the server.
#[derive(Deserialize)]
struct SchemaFile {
    #[serde(default)]
    table: Vec<Table>,
}

impl Schema {
    /// Parses the `[[table]]` entries of a TOML schema file and validates them.
    pub fn from_toml(text: &str) -> Result<Schema, SchemaError> {
        let file: SchemaFile = toml::from_str(text).map_err(|e| SchemaError::Parse(e.to_string()))?;
        Schema::new(file.table)
    }

    /// Validates tables and computes the version digest.
    pub fn new(tables: Vec<Table>) -> Result<Schema, SchemaError> {
        validate(&tables)?;
        let bytes = postcard::to_stdvec(&tables).map_err(|e| SchemaError::Parse(e.to_string()))?;
        let version = hex::encode(Sha256::digest(&bytes));
        Ok(Schema { version, tables })
    }

    /// The table named `name`.
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Whether events recorded under `older` can still be applied under this schema (R17): every
    /// table and column of `older` still exists with the same type and key, and anything added
    /// is a new table or a nullable column. Returns what breaks compatibility otherwise.
    pub fn accepts_events_from(&self, older: &Schema) -> Result<(), String> {
        for old in &older.tables {
            let Some(new) = self.table(&old.name) else {
                return Err(format!("table {:?} was removed", old.name));
            };
            if new.primary_key != old.primary_key || new.auto_number != old.auto_number {
                return Err(format!("the key of table {:?} changed", old.name));
            }
            for col in &old.columns {
                match new.column(&col.name) {
                    None => return Err(format!("column {}.{} was removed", old.name, col.name)),
                    Some(c) if c.ty != col.ty => {
                        return Err(format!("column {}.{} changed type", old.name, col.name));
                    }
                    Some(c) if !c.nullable && col.nullable => {
                        return Err(format!("column {}.{} became NOT NULL", old.name, col.name));
                    }
                    Some(_) => {}
                }
            }
            for col in &new.columns {
                if old.column(&col.name).is_none() && !col.nullable {
                    return Err(format!("new column {}.{} is NOT NULL", old.name, col.name));
                }
            }
        }
        Ok(())
    }
}

impl Table {
    /// The column named `name`.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The foreign key stored in `column`, if any.
    pub fn foreign_key(&self, column: &str) -> Option<&ForeignKey> {
        self.foreign_keys.iter().find(|f| f.column == column)
    }

    /// Whether devices receive rows of this table.
    pub fn is_received(&self) -> bool {
        self.scope != Scope::None
    }
}

/// Whether `name` is a plain identifier that is safe to quote into SQL.
pub fn is_valid_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_');
    first_ok
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.to_ascii_lowercase().starts_with("ferry_")
}

fn ident(name: &str) -> Result<(), SchemaError> {
    if is_valid_identifier(name) { Ok(()) } else { Err(SchemaError::InvalidIdentifier(name.to_string())) }
}

fn validate(tables: &[Table]) -> Result<(), SchemaError> {
    if tables.is_empty() {
        return Err(SchemaError::Empty);
    }
    let mut seen: Vec<&Table> = Vec::new();
    for table in tables {
        ident(&table.name)?;
        let problem = |p: String| SchemaError::Table { table: table.name.clone(), problem: p };
        if seen.iter().any(|t| t.name.eq_ignore_ascii_case(&table.name)) {
            return Err(SchemaError::DuplicateTable(table.name.clone()));
        }
        let mut names = HashSet::new();
        for col in &table.columns {
            ident(&col.name)?;
            if !names.insert(col.name.to_ascii_lowercase()) {
                return Err(SchemaError::DuplicateColumn { table: table.name.clone(), column: col.name.clone() });
            }
        }
        if table.primary_key.is_empty() {
            return Err(problem("declares no primary key".into()));
        }
        for pk in &table.primary_key {
            match table.column(pk) {
                None => return Err(problem(format!("primary key column {pk:?} is not a column"))),
                Some(c) if c.nullable => {
                    return Err(problem(format!("primary key column {pk:?} must be declared nullable = false")));
                }
                Some(c) if !matches!(c.ty, ColumnType::Integer | ColumnType::Text) => {
                    return Err(problem(format!("primary key column {pk:?} must be integer or text")));
                }
                Some(_) => {}
            }
        }
        if table.auto_number {
            let single_int = table.primary_key.len() == 1
                && table.column(&table.primary_key[0]).is_some_and(|c| c.ty == ColumnType::Integer);
            if !single_int {
                return Err(problem("auto_number needs a single integer primary key".into()));
            }
        }
        for fk in &table.foreign_keys {
            let Some(col) = table.column(&fk.column) else {
                return Err(problem(format!("foreign key column {:?} is not a column", fk.column)));
            };
            let Some(parent) = seen.iter().find(|t| t.name == fk.references) else {
                return Err(problem(format!(
                    "foreign key {:?} references {:?}, which must be a table declared earlier",
                    fk.column, fk.references
                )));
            };
            if parent.primary_key.len() != 1 {
                return Err(problem(format!("foreign key {:?}: {:?} has a composite key", fk.column, parent.name)));
            }
            let parent_key_ty = parent.column(&parent.primary_key[0]).map(|c| c.ty);
            if parent_key_ty != Some(col.ty) {
                return Err(problem(format!(
                    "foreign key {:?} has another type than {}'s key",
                    fk.column, parent.name
                )));
            }
            // R8: a device must never hold a child whose parent it cannot have.
            let parent_always_visible = parent.scope == Scope::Everyone;
            let child_follows_parent = table.scope == Scope::Parent { column: fk.column.clone() };
            if table.is_received() && !parent_always_visible && !child_follows_parent {
                return Err(problem(format!(
                    "scope could give a device a row without its parent: {:?} is not received by everyone, so \
                     this table's scope must be {{ parent = {{ column = {:?} }} }}",
                    parent.name, fk.column
                )));
            }
        }
        match &table.scope {
            Scope::Everyone | Scope::None => {}
            Scope::Claim { column, claim } => {
                if table.column(column).is_none() {
                    return Err(problem(format!("scope column {column:?} is not a column")));
                }
                if claim.is_empty() {
                    return Err(problem("scope claim is empty".into()));
                }
            }
            Scope::Parent { column } => {
                if table.foreign_key(column).is_none() {
                    return Err(problem(format!("scope parent column {column:?} is not a foreign key")));
                }
                if table.column(column).is_some_and(|c| c.nullable) {
                    return Err(problem(format!("scope parent column {column:?} must be nullable = false")));
                }
            }
        }
        seen.push(table);
    }
    Ok(())
}
