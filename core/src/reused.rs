//! Statements the engine runs for every batch, kept prepared on their connection.
//!
//! diesel's `sql_query` prepares its text, runs it once and closes it again: for a batch of 250
//! rows that is a parse of a statement with hundreds of placeholders, and a description of every
//! placeholder sent back to the client, per batch. A [`Reused`] statement is cached by its text
//! in the connection's statement cache instead, so a text seen before is only executed. Texts
//! with one placeholder per row are made from [`shape`]d row counts (rounded up to a power of four,
//! the extra places repeating the last row), so a connection keeps a few shapes per statement,
//! not one per batch size.

use diesel::QueryResult;
use diesel::mysql::Mysql;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, SmallInt, Text, Untyped};

/// One bound value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    BigInt(i64),
    SmallInt(i16),
    Text(String),
}

/// A statement text with `?` placeholders (and no `?` anywhere else) and its values, in order.
#[derive(Debug, Clone)]
pub(crate) struct Reused {
    sql: String,
    values: Vec<Value>,
}

impl Reused {
    pub(crate) fn new(sql: impl Into<String>) -> Reused {
        Reused { sql: sql.into(), values: Vec::new() }
    }

    pub(crate) fn big(mut self, v: i64) -> Reused {
        self.values.push(Value::BigInt(v));
        self
    }

    pub(crate) fn small(mut self, v: i16) -> Reused {
        self.values.push(Value::SmallInt(v));
        self
    }

    pub(crate) fn text(mut self, v: impl Into<String>) -> Reused {
        self.values.push(Value::Text(v.into()));
        self
    }
}

/// Most rows one statement with placeholders per row is written for: longer lists are split
/// into statements of this many rows (within the caller's transaction). The statement cache
/// keeps, for every text, MariaDB's description of each placeholder (about 200 bytes of heap
/// apiece), so a connection's cache stays below one text per power of four up to this many rows
/// per statement, whatever the batch and flush sizes (an uncapped 1,000-row flush of granted
/// rows was a 3,072-placeholder text of some 600 KB, on each of the pool's connections in time).
const MOST_ROWS: usize = 256;

/// `items` in the parts one statement each is written for: [`MOST_ROWS`] at most.
pub(crate) fn chunked<T>(items: &[T]) -> std::slice::Chunks<'_, T> {
    items.chunks(MOST_ROWS)
}

/// The row count a statement with one or more placeholders per row is written for: `rows`
/// rounded up to a power of four (callers split lists with [`chunked`] first). Five
/// shapes up to 256 rows: padding at most quadruples a short list, and a connection meets every
/// shape early instead of the rare ones over hours. The caller fills the extra places by
/// repeating its last row, which changes nothing in `IN (...)` lists and `CASE` branches.
pub(crate) fn shape(rows: usize) -> usize {
    let mut shape = 1;
    while shape < rows {
        shape *= 4;
    }
    shape
}

/// `items` followed by its last item repeated up to [`shape`]`(items.len())` items in all: the
/// values for a statement text written for that shape.
pub(crate) fn padded<T>(items: &[T]) -> impl Iterator<Item = &T> + Clone {
    let extra = shape(items.len()) - items.len();
    items.iter().chain(items.last().into_iter().cycle().take(extra))
}

impl QueryFragment<Mysql> for Reused {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        let mut parts = self.sql.split('?');
        if let Some(first) = parts.next() {
            out.push_sql(first);
        }
        let mut values = self.values.iter();
        for part in parts {
            match values.next() {
                Some(Value::BigInt(v)) => out.push_bind_param::<BigInt, _>(v)?,
                Some(Value::SmallInt(v)) => out.push_bind_param::<SmallInt, _>(v)?,
                Some(Value::Text(v)) => out.push_bind_param::<Text, _>(v)?,
                None => {
                    return Err(diesel::result::Error::QueryBuilderError(
                        format!("more placeholders than values in: {}", self.sql).into(),
                    ));
                }
            }
            out.push_sql(part);
        }
        if values.next().is_some() {
            return Err(diesel::result::Error::QueryBuilderError(
                format!("more values than placeholders in: {}", self.sql).into(),
            ));
        }
        Ok(())
    }
}

/// No static id: the statement cache keys it by its text and the types of its values.
impl QueryId for Reused {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

/// Rows are read by column name, as with `sql_query`.
impl Query for Reused {
    type SqlType = Untyped;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_powers_of_four() {
        assert_eq!(
            [0, 1, 2, 4, 5, 16, 17, 64, 65, 250, 256, 257].map(shape),
            [1, 1, 4, 4, 16, 16, 64, 64, 256, 256, 256, 1024]
        );
    }

    #[test]
    fn split_lists_have_at_most_five_shapes() {
        let mut seen = std::collections::BTreeSet::new();
        for n in 1..=3_000usize {
            let items: Vec<usize> = (0..n).collect();
            for chunk in chunked(&items) {
                seen.insert(shape(chunk.len()));
                assert_eq!(padded(chunk).count(), shape(chunk.len()));
            }
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [1, 4, 16, 64, 256]);
    }

    #[test]
    fn padding_repeats_the_last_item_up_to_the_shape() {
        assert_eq!(padded(&[1, 2, 3]).copied().collect::<Vec<_>>(), [1, 2, 3, 3]);
        assert_eq!(padded(&[1, 2]).copied().collect::<Vec<_>>(), [1, 2, 2, 2]);
        assert_eq!(padded(&[1, 2, 3, 4]).count(), 4);
        assert_eq!(padded::<i32>(&[]).count(), 0);
    }

    #[test]
    fn values_fill_the_placeholders_in_order() {
        let q = Reused::new("SELECT ? + ?, ?").big(1).small(2).text("x");
        let sql = diesel::debug_query::<Mysql, _>(&q).to_string();
        assert!(sql.starts_with("SELECT ? + ?, ?"), "{sql}");
        assert!(sql.contains("binds: [1, 2, \"x\"]"), "{sql}");
    }

    #[test]
    fn a_count_mismatch_is_an_error_not_a_wrong_statement() {
        use diesel::query_builder::QueryBuilder as _;
        for q in [Reused::new("SELECT ?, ?").big(1), Reused::new("SELECT ?").big(1).big(2)] {
            let mut qb = diesel::mysql::MysqlQueryBuilder::new();
            assert!(q.to_sql(&mut qb, &Mysql).is_err(), "{q:?}");
            let _ = qb.finish();
        }
    }
}
