//! The schema file as the server reads it: the synced tables (served to devices) plus business
//! rules in SQL for each backend (trusted operator input, never served).

use std::path::Path;

use ferry_protocol::{Schema, SchemaError};
use serde::Deserialize;

/// A loaded, validated schema file.
#[derive(Debug, Clone)]
pub struct SchemaFile {
    /// The synced tables, as served to devices.
    pub schema: Schema,
    /// Extra SQL run after the tables are created (triggers, checks, functions).
    pub setup: SetupSql,
}

/// Per-backend SQL from the `[sql]` section of the schema file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupSql {
    /// Run on the SQLite backend.
    #[serde(default)]
    pub sqlite: String,
    /// Run on the PostgreSQL backend.
    #[serde(default)]
    pub postgres: String,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    sql: SetupSql,
}

/// Why a schema file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SchemaFileError {
    /// The file could not be read.
    #[error("cannot read schema file {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The tables are invalid.
    #[error(transparent)]
    Schema(#[from] SchemaError),
}

impl SchemaFile {
    /// Parses and validates a schema file's text.
    pub fn parse(text: &str) -> Result<SchemaFile, SchemaFileError> {
        let schema = Schema::from_toml(text)?;
        let raw: Raw = toml::from_str(text).map_err(|e| SchemaError::Parse(e.to_string()))?;
        Ok(SchemaFile { schema, setup: raw.sql })
    }

    /// Reads, parses and validates a schema file.
    pub fn load(path: &Path) -> Result<SchemaFile, SchemaFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| SchemaFileError::Read { path: path.display().to_string(), source })?;
        SchemaFile::parse(&text)
    }

    /// The example sales schema that ships with Ferry (`examples/sales.toml`).
    pub fn example() -> SchemaFile {
        // The example is validated by tests; failing here would be a build defect.
        SchemaFile::parse(EXAMPLE).expect("the bundled example schema is valid")
    }
}

/// The bundled example schema's text.
pub const EXAMPLE: &str = include_str!("../../examples/sales.toml");
