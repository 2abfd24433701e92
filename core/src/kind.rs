//! The extension point: a `PayoutKind` turns one target row into one validated Money grant request.
//!
//! The engine is generic over kinds: it claims rows and writes outcomes with SQL common to every
//! target table, and asks the kind (through [`KindRegistry`]) only for the columns to read with
//! the claim and to build requests from them. A new kind is a crate implementing [`PayoutKind`]
//! plus one `register` line in the daemon.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, FixedOffset, NaiveDate, TimeZone, Utc};
use diesel::QueryableByName;
use diesel::mysql::Mysql;
use diesel_async::AsyncMysqlConnection;
use serde::Serialize;

use crate::domain::{CampaignId, TargetId};
use crate::repo::{ClaimCursor, ClaimSpec, Claimed};

/// Money's `Idempotency-Key`: derived from the row's identity only, so every attempt and every
/// re-grant of a row carries the same key. At most 128 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// `<prefix>-<campaign>-<target>`, e.g. `point-43-1234567`.
    pub fn for_row(prefix: &str, campaign: CampaignId, target: TargetId) -> IdempotencyKey {
        IdempotencyKey(format!("{prefix}-{campaign}-{target}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether Money accepts the key: 1 to 128 printable ASCII characters.
    pub fn is_valid(&self) -> bool {
        (1..=128).contains(&self.0.len()) && self.0.bytes().all(|b| b.is_ascii_graphic())
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One grant request, ready to send: the body is serialised once so that every attempt sends
/// byte-identical JSON.
#[derive(Debug, Clone)]
pub struct GrantRequest {
    pub target: TargetId,
    pub endpoint: &'static str,
    pub idempotency_key: IdempotencyKey,
    pub body: Bytes,
}

impl GrantRequest {
    pub fn new<B: Serialize>(
        target: TargetId,
        endpoint: &'static str,
        idempotency_key: IdempotencyKey,
        body: &B,
    ) -> Result<GrantRequest, InvalidRow> {
        let body = serde_json::to_vec(body).map_err(|e| InvalidRow {
            code: "unserialisable_row".to_owned(),
            message: format!("the row cannot be serialised to JSON: {e}"),
        })?;
        Ok(GrantRequest { target, endpoint, idempotency_key, body: Bytes::from(body) })
    }
}

/// Why a row never reaches Money. `code` names the field, e.g. `invalid_expiry_at`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct InvalidRow {
    pub code: String,
    pub message: String,
}

impl InvalidRow {
    pub fn field(field: &str, message: impl Into<String>) -> InvalidRow {
        InvalidRow { code: format!("invalid_{field}"), message: message.into() }
    }
}

/// What validation needs besides the row: the configured limits and the current time.
#[derive(Debug, Clone)]
pub struct ValidationContext {
    pub now: DateTime<Utc>,
    /// Largest `amount` a single point row may carry.
    pub max_point_amount: i64,
    /// The UTC offset `expiry_at` is written in (the contract's default is +09:00).
    pub expiry_offset: FixedOffset,
}

/// Checks that a text field has 1..=`max_chars` characters (not bytes).
pub fn check_text(field: &str, value: &str, max_chars: usize) -> Result<(), InvalidRow> {
    let n = value.chars().count();
    if n == 0 {
        return Err(InvalidRow::field(field, format!("{field} is empty")));
    }
    if n > max_chars {
        return Err(InvalidRow::field(
            field,
            format!("{field} has {n} characters, more than the allowed {max_chars}"),
        ));
    }
    Ok(())
}

/// Parses `yyyyMMddHHmmss` in `offset` and checks it lies after `now`.
///
/// Exactly 14 ASCII digits are required (date libraries accept 13 digits, spaces or second 60).
pub fn check_expiry(
    value: &str,
    offset: FixedOffset,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, InvalidRow> {
    let bad = |why: &str| InvalidRow::field("expiry_at", format!("expiry_at {value:?} {why}"));
    if value.len() != 14 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("is not 14 digits yyyyMMddHHmmss"));
    }
    let num = |range: std::ops::Range<usize>| value[range].parse::<u32>().unwrap_or(u32::MAX);
    let year = i32::try_from(num(0..4)).map_err(|_| bad("has no valid year"))?;
    let date = NaiveDate::from_ymd_opt(year, num(4..6), num(6..8))
        .ok_or_else(|| bad("is not a real date"))?;
    let local = date
        .and_hms_opt(num(8..10), num(10..12), num(12..14))
        .ok_or_else(|| bad("is not a real time of day"))?;
    let at = offset
        .from_local_datetime(&local)
        .single()
        .ok_or_else(|| bad("is not a real date-time"))?
        .with_timezone(&Utc);
    if at <= now {
        return Err(bad("is already past"));
    }
    Ok(at)
}

/// A kind of payout: one target table, one Money endpoint.
///
/// Implementations are pure: they map a loaded row to a request or to the field that makes it
/// invalid. Loading, claiming and recording outcomes belong to the engine.
pub trait PayoutKind: Send + Sync + 'static {
    /// The value of `campaigns.kind` this kind serves, e.g. `POINT`.
    const KIND: &'static str;
    /// The table holding this kind's target rows (with the engine's common columns).
    const TABLE: &'static str;
    /// The columns `Row` is loaded from, as a `SELECT` list.
    const COLUMNS: &'static str;
    /// Money's path for this kind's grants, e.g. `/v1/points/grants`.
    const ENDPOINT: &'static str;

    type Row: QueryableByName<Mysql> + Send + 'static;

    /// The row's primary key.
    fn target_id(row: &Self::Row) -> TargetId;

    /// The row's idempotency key: a function of its identity alone, never random or per attempt.
    fn idempotency_key(campaign: CampaignId, target: TargetId) -> IdempotencyKey;

    /// Validates the row and builds its request (with [`Self::idempotency_key`]).
    fn to_request(
        campaign: CampaignId,
        row: &Self::Row,
        ctx: &ValidationContext,
    ) -> Result<GrantRequest, InvalidRow>;
}

/// A claimed row after loading: either a request to send or the reason it never will be.
#[derive(Debug)]
pub struct Prepared {
    pub target: TargetId,
    pub request: Result<GrantRequest, InvalidRow>,
}

/// The object-safe face of a [`PayoutKind`] that the engine works with.
#[async_trait]
pub trait ErasedKind: Send + Sync {
    fn kind(&self) -> &'static str;
    fn table(&self) -> &'static str;
    /// Loads the given rows of `campaign` and prepares their requests, in no particular order.
    async fn prepare(
        &self,
        conn: &mut AsyncMysqlConnection,
        campaign: CampaignId,
        ids: &[TargetId],
        ctx: &ValidationContext,
    ) -> Result<Vec<Prepared>, diesel::result::Error>;

    /// Claims a batch of rows (see [`crate::repo::claim`]) and prepares their requests from the
    /// claim's own read of them, in claim order.
    async fn claim_prepared(
        &self,
        conn: &mut AsyncMysqlConnection,
        spec: ClaimSpec<'_>,
        cursor: &mut ClaimCursor,
        ctx: &ValidationContext,
    ) -> Result<Vec<(Claimed, Prepared)>, diesel::result::Error>;
}

struct Erased<K>(std::marker::PhantomData<K>);

impl<K: PayoutKind> Erased<K> {
    /// One row's request, validated.
    fn prepared(campaign: CampaignId, row: &K::Row, ctx: &ValidationContext) -> Prepared {
        Prepared { target: K::target_id(row), request: K::to_request(campaign, row, ctx) }
    }
}

#[async_trait]
impl<K: PayoutKind> ErasedKind for Erased<K> {
    fn kind(&self) -> &'static str {
        K::KIND
    }

    fn table(&self) -> &'static str {
        K::TABLE
    }

    async fn prepare(
        &self,
        conn: &mut AsyncMysqlConnection,
        campaign: CampaignId,
        ids: &[TargetId],
        ctx: &ValidationContext,
    ) -> Result<Vec<Prepared>, diesel::result::Error> {
        let rows: Vec<K::Row> = crate::repo::load_rows(conn, K::TABLE, K::COLUMNS, ids).await?;
        Ok(rows.iter().map(|row| Erased::<K>::prepared(campaign, row, ctx)).collect())
    }

    async fn claim_prepared(
        &self,
        conn: &mut AsyncMysqlConnection,
        spec: ClaimSpec<'_>,
        cursor: &mut ClaimCursor,
        ctx: &ValidationContext,
    ) -> Result<Vec<(Claimed, Prepared)>, diesel::result::Error> {
        let rows: Vec<(Claimed, K::Row)> =
            crate::repo::claim_rows(conn, K::TABLE, K::COLUMNS, spec, cursor).await?;
        Ok(rows
            .into_iter()
            .map(|(claimed, row)| {
                let prepared = Erased::<K>::prepared(spec.campaign, &row, ctx);
                (claimed, prepared)
            })
            .collect())
    }
}

/// The kinds this daemon serves, by `campaigns.kind`.
#[derive(Clone, Default)]
pub struct KindRegistry {
    kinds: BTreeMap<&'static str, Arc<dyn ErasedKind>>,
}

impl KindRegistry {
    pub fn new() -> KindRegistry {
        KindRegistry::default()
    }

    pub fn register<K: PayoutKind>(&mut self) -> &mut KindRegistry {
        self.kinds.insert(K::KIND, Arc::new(Erased::<K>(std::marker::PhantomData)));
        self
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn ErasedKind>> {
        self.kinds.get(kind).cloned()
    }

    pub fn kinds(&self) -> impl Iterator<Item = &Arc<dyn ErasedKind>> {
        self.kinds.values()
    }
}

impl fmt::Debug for KindRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.kinds.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kst() -> FixedOffset {
        FixedOffset::east_opt(9 * 3600).unwrap()
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, 0, 0, 0).unwrap()
    }

    #[test]
    fn expiry_must_be_fourteen_digits_of_a_real_future_time() {
        let table = [
            ("20271231235959", true),
            ("2027123123595", false),
            ("202712312359590", false),
            (" 2027123123595", false),
            ("2027123123595a", false),
            ("20270231000000", false),
            ("20271231240000", false),
            ("20271231235960", false),
            ("20261125085959", false), // 23:59:59 UTC the day before: past
            ("20261125090001", true),  // 00:00:01 UTC: one second ahead
            ("", false),
        ];
        for (value, ok) in table {
            let got = check_expiry(value, kst(), now());
            assert_eq!(got.is_ok(), ok, "{value:?}: {got:?}");
            if let Err(e) = got {
                assert_eq!(e.code, "invalid_expiry_at");
            }
        }
    }

    #[test]
    fn text_fields_count_characters_not_bytes() {
        assert!(check_text("reason", &"가".repeat(255), 255).is_ok());
        assert!(check_text("reason", &"가".repeat(256), 255).is_err());
        let empty = check_text("customer_uid", "", 64);
        assert_eq!(empty.map_err(|e| e.code), Err("invalid_customer_uid".to_owned()));
    }

    #[test]
    fn idempotency_keys_are_deterministic_and_printable() {
        let a = IdempotencyKey::for_row("point", CampaignId(43), TargetId(1_234_567));
        let b = IdempotencyKey::for_row("point", CampaignId(43), TargetId(1_234_567));
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "point-43-1234567");
        assert!(a.is_valid());
    }
}

/// Checks every kind must pass; each kind crate runs them from its tests with sample rows.
pub mod conformance {
    use super::*;

    /// Sample rows a kind provides for the conformance suite.
    pub trait Samples: PayoutKind {
        /// A valid row with the given id.
        fn valid(campaign: CampaignId, id: TargetId) -> Self::Row;
        /// Invalid rows, each with the error code it must produce.
        fn invalid(campaign: CampaignId) -> Vec<(Self::Row, &'static str)>;
    }

    /// A context with the contract's defaults at a fixed moment.
    pub fn context() -> ValidationContext {
        ValidationContext {
            now: Utc.with_ymd_and_hms(2026, 11, 25, 0, 0, 0).single().unwrap_or_default(),
            max_point_amount: 1_000_000,
            expiry_offset: FixedOffset::east_opt(9 * 3600).unwrap_or(Utc.fix()),
        }
    }

    use chrono::Offset;

    /// Runs the whole suite; returns the first violation.
    pub fn check<K: Samples>() -> Result<(), String> {
        let ctx = context();
        let campaign = CampaignId(43);
        let row = K::valid(campaign, TargetId(1_234_567));
        let a =
            K::to_request(campaign, &row, &ctx).map_err(|e| format!("valid row rejected: {e}"))?;
        let b =
            K::to_request(campaign, &row, &ctx).map_err(|e| format!("valid row rejected: {e}"))?;
        if a.target != K::target_id(&row) {
            return Err("request target differs from the row id".into());
        }
        if a.idempotency_key != K::idempotency_key(campaign, a.target) {
            return Err("request does not carry the kind's idempotency key".into());
        }
        if a.idempotency_key != b.idempotency_key || a.body != b.body {
            return Err("two builds of one row differ: key and body must be identical".into());
        }
        if !a.idempotency_key.is_valid() {
            return Err(format!(
                "idempotency key {} is not 1-128 printable ASCII",
                a.idempotency_key
            ));
        }
        if a.endpoint != K::ENDPOINT {
            return Err("request endpoint differs from ENDPOINT".into());
        }
        let other = K::to_request(campaign, &K::valid(campaign, TargetId(7)), &ctx)
            .map_err(|e| format!("valid row rejected: {e}"))?;
        if other.idempotency_key == a.idempotency_key {
            return Err("two rows share an idempotency key".into());
        }
        let body: serde_json::Value =
            serde_json::from_slice(&a.body).map_err(|e| format!("body is not JSON: {e}"))?;
        if body.get("campaign_id").and_then(|v| v.as_i64()) != Some(campaign.0) {
            return Err("body lacks campaign_id".into());
        }
        for (row, code) in K::invalid(campaign) {
            match K::to_request(campaign, &row, &ctx) {
                Ok(_) => return Err(format!("an invalid row ({code}) was accepted")),
                Err(e) if e.code != code => {
                    return Err(format!("expected {code}, got {}: {}", e.code, e.message));
                }
                Err(_) => {}
            }
        }
        Ok(())
    }
}
