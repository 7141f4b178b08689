//! Messages read in place: views of a postcard-encoded change page whose texts and bytes borrow
//! from the encoded message instead of being copied out of it.
//!
//! A device receives many rows per page and only binds each value once into SQLite, so copying
//! every text into its own `String` first is wasted work. The views have exactly the wire shape
//! of the owned types ([`ChangePage`], [`TableRows`], [`Value`]): a postcard message of one reads
//! as the other. They are for postcard only: JSON escapes texts and writes bytes as hex, so a
//! JSON message is decoded into the owned types.

use std::borrow::Cow;

use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

use crate::receive::{ChangePage, Cursor, Removal, TableRows};
use crate::value::{BlobRef, Value};

/// A [`Value`] whose text or bytes borrow from the message it was read from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueView<'a> {
    /// SQL NULL.
    Null,
    /// A signed 64-bit integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(&'a str),
    /// Raw bytes.
    Bytes(&'a [u8]),
    /// A reference to a content-addressed blob (rare: owned when read).
    Blob(Cow<'a, BlobRef>),
}

impl ValueView<'_> {
    /// The owned value.
    pub fn to_value(&self) -> Value {
        match self {
            ValueView::Null => Value::Null,
            ValueView::Integer(i) => Value::Integer(*i),
            ValueView::Real(r) => Value::Real(*r),
            ValueView::Text(t) => Value::Text((*t).to_string()),
            ValueView::Bytes(b) => Value::Bytes(b.to_vec()),
            ValueView::Blob(b) => Value::Blob(b.clone().into_owned()),
        }
    }
}

/// Anything that can be looked at as a [`ValueView`]: owned values, views, and references to
/// either, so code that binds values is written once for both.
pub trait AsValueView {
    /// The value, borrowed.
    fn view(&self) -> ValueView<'_>;
}

impl AsValueView for Value {
    fn view(&self) -> ValueView<'_> {
        match self {
            Value::Null => ValueView::Null,
            Value::Integer(i) => ValueView::Integer(*i),
            Value::Real(r) => ValueView::Real(*r),
            Value::Text(t) => ValueView::Text(t),
            Value::Bytes(b) => ValueView::Bytes(b),
            Value::Blob(b) => ValueView::Blob(Cow::Borrowed(b)),
        }
    }
}

impl AsValueView for ValueView<'_> {
    fn view(&self) -> ValueView<'_> {
        match self {
            ValueView::Blob(b) => ValueView::Blob(Cow::Borrowed(b.as_ref())),
            ValueView::Null => ValueView::Null,
            ValueView::Integer(i) => ValueView::Integer(*i),
            ValueView::Real(r) => ValueView::Real(*r),
            ValueView::Text(t) => ValueView::Text(t),
            ValueView::Bytes(b) => ValueView::Bytes(b),
        }
    }
}

impl<T: AsValueView + ?Sized> AsValueView for &T {
    fn view(&self) -> ValueView<'_> {
        (**self).view()
    }
}

/// A [`ChangePage`] read in place (postcard only; see the module documentation). `Yokeable`, so
/// a view can travel with the message it borrows from (`yoke::Yoke`): a device reads a page
/// once, on arrival, and its apply uses that reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, yoke::Yokeable)]
pub struct ChangePageView<'a> {
    /// See [`ChangePage::full`].
    pub full: bool,
    /// See [`ChangePage::upserts`].
    #[serde(borrow)]
    pub upserts: Vec<TableRowsView<'a>>,
    /// See [`ChangePage::removals`] (owned: removals are few and keyed by whole values).
    pub removals: Vec<Removal>,
    /// See [`ChangePage::next`].
    pub next: Cursor,
    /// See [`ChangePage::last`].
    pub last: bool,
}

/// A [`TableRows`] read in place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRowsView<'a> {
    /// The table.
    pub table: &'a str,
    /// Column names, the same for every row below.
    #[serde(borrow)]
    pub columns: Vec<&'a str>,
    /// Each row's server version, in the same order as `rows`.
    pub versions: Vec<u64>,
    /// The rows.
    #[serde(borrow)]
    pub rows: RowsView<'a>,
}

/// The rows of a [`TableRowsView`], read into one vector of values per table rather than one
/// per row. On the wire they are a sequence of rows, each a sequence of values, like
/// [`TableRows::rows`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RowsView<'a> {
    values: Vec<ValueView<'a>>,
    /// Where each row ends in `values`.
    ends: Vec<usize>,
}

impl<'a> RowsView<'a> {
    /// The number of rows.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The rows in order, each as its values.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[ValueView<'a>]> {
        self.ends.iter().enumerate().map(|(i, &end)| {
            let start = if i == 0 { 0 } else { self.ends[i - 1] };
            &self.values[start..end]
        })
    }
}

impl Serialize for RowsView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut rows = serializer.serialize_seq(Some(self.len()))?;
        for row in self.iter() {
            rows.serialize_element(row)?;
        }
        rows.end()
    }
}

/// At most this many rows or values are reserved for on the word of a sequence's length prefix
/// (a hostile prefix must not allocate much before the bytes behind it are read).
const MAX_RESERVED: usize = 4096;

impl<'de: 'a, 'a> Deserialize<'de> for RowsView<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Rows<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Rows<'a> {
            type Value = RowsView<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a sequence of rows")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RowsView<'a>, A::Error> {
                let mut rows = RowsView::default();
                rows.ends.reserve(seq.size_hint().unwrap_or(0).min(MAX_RESERVED));
                while seq.next_element_seed(Row(&mut rows.values))?.is_some() {
                    rows.ends.push(rows.values.len());
                }
                Ok(rows)
            }
        }
        /// Reads one row's values onto the end of the shared vector.
        struct Row<'v, 'a>(&'v mut Vec<ValueView<'a>>);
        impl<'de: 'a, 'a> DeserializeSeed<'de> for Row<'_, 'a> {
            type Value = ();
            fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
                deserializer.deserialize_seq(self)
            }
        }
        impl<'de: 'a, 'a> Visitor<'de> for Row<'_, 'a> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a row of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                self.0.reserve(seq.size_hint().unwrap_or(0).min(MAX_RESERVED));
                while let Some(value) = seq.next_element()? {
                    self.0.push(value);
                }
                Ok(())
            }
        }
        deserializer.deserialize_seq(Rows(std::marker::PhantomData))
    }
}

impl ChangePageView<'_> {
    /// The owned page.
    pub fn to_page(&self) -> ChangePage {
        ChangePage {
            full: self.full,
            upserts: self
                .upserts
                .iter()
                .map(|t| TableRows {
                    table: t.table.to_string(),
                    columns: t.columns.iter().map(|c| c.to_string()).collect(),
                    versions: t.versions.clone(),
                    rows: t.rows.iter().map(|row| row.iter().map(ValueView::to_value).collect()).collect(),
                })
                .collect(),
            removals: self.removals.clone(),
            next: self.next.clone(),
            last: self.last,
        }
    }
}
