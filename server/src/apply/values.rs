//! Validating an event's values against its table before anything touches the database.

use ferry_protocol::{Column, ColumnType, Event, Failure, FailureCode, Op, Row, Table, Value};

fn fail(code: FailureCode, column: Option<&str>, message: String) -> Failure {
    Failure { code, message, column: column.map(str::to_owned), server_row: None }
}

/// Checks the key's shape and every value's column and type; returns the values, with integers
/// written to real columns converted to reals.
pub fn check(table: &Table, event: &Event) -> Result<Row, Failure> {
    if event.key.0.len() != table.primary_key.len() {
        return Err(fail(
            FailureCode::Validation,
            None,
            format!(
                "{} has a key of {} column(s); the event carries {}",
                table.name,
                table.primary_key.len(),
                event.key.0.len()
            ),
        ));
    }
    for (name, value) in table.primary_key.iter().zip(&event.key.0) {
        let ok = matches!(
            (table.column(name).map(|c| c.ty), value),
            (Some(ColumnType::Integer), Value::Integer(_)) | (Some(ColumnType::Text), Value::Text(_))
        );
        if !ok {
            return Err(fail(
                FailureCode::Validation,
                Some(name),
                format!("key column {name} cannot be {}", value.kind()),
            ));
        }
    }
    let mut out = Row::new();
    for (name, value) in &event.values {
        let Some(column) = table.column(name) else {
            return Err(fail(FailureCode::UnknownColumn, Some(name), format!("{} has no column {name:?}", table.name)));
        };
        out.insert(name.clone(), convert(column, value.clone())?);
    }
    for name in &event.changed {
        if table.column(name).is_none() {
            return Err(fail(FailureCode::UnknownColumn, Some(name), format!("{} has no column {name:?}", table.name)));
        }
    }
    if event.op == Op::Insert {
        // The key travels in `key`; the row's key columns must agree with it.
        for (name, key_value) in table.primary_key.iter().zip(&event.key.0) {
            match out.get(name) {
                Some(v) if v != key_value => {
                    return Err(fail(
                        FailureCode::Validation,
                        Some(name),
                        format!("{name} differs from the event's key"),
                    ));
                }
                _ => {
                    out.insert(name.clone(), key_value.clone());
                }
            }
        }
        for column in &table.columns {
            let missing = matches!(out.get(&column.name), None | Some(Value::Null));
            if missing && !column.nullable {
                return Err(fail(
                    FailureCode::Validation,
                    Some(&column.name),
                    format!("{}.{} is required", table.name, column.name),
                ));
            }
        }
    }
    Ok(out)
}

fn convert(column: &Column, value: Value) -> Result<Value, Failure> {
    let ok = match (&value, column.ty) {
        (Value::Null, _) => {
            if column.nullable {
                true
            } else {
                return Err(fail(
                    FailureCode::Validation,
                    Some(&column.name),
                    format!("{} is required and cannot be null", column.name),
                ));
            }
        }
        (Value::Integer(i), ColumnType::Real) => return Ok(Value::Real(*i as f64)),
        (Value::Real(r), ColumnType::Real) => r.is_finite(),
        (Value::Integer(_), ColumnType::Integer)
        | (Value::Text(_), ColumnType::Text)
        | (Value::Bytes(_), ColumnType::Bytes)
        | (Value::Blob(_), ColumnType::Blob) => true,
        _ => false,
    };
    if ok {
        Ok(value)
    } else {
        Err(fail(
            FailureCode::TypeMismatch,
            Some(&column.name),
            format!("{} is {} but the event carries {}", column.name, column.ty.as_str(), value.kind()),
        ))
    }
}

/// The row's values paired with their columns, in the table's column order.
pub fn columns(table: &Table, mut row: Row) -> Vec<(&Column, Value)> {
    table.columns.iter().filter_map(|c| row.remove(&c.name).map(|v| (c, v))).collect()
}
