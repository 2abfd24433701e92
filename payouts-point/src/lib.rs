//! Points: one `point_targets` row becomes one `POST /v1/points/grants`.

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use payout_core::kind::{check_expiry, check_text};
use payout_core::{
    CampaignId, GrantRequest, IdempotencyKey, InvalidRow, PayoutKind, TargetId, ValidationContext,
};
use serde::Serialize;

/// The point kind (`campaigns.kind = 'POINT'`).
pub struct Point;

/// The columns of a point row the request is built from.
#[derive(Debug, Clone, QueryableByName)]
pub struct PointRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = BigInt)]
    pub event_id: i64,
    #[diesel(sql_type = Text)]
    pub customer_uid: String,
    #[diesel(sql_type = BigInt)]
    pub amount: i64,
    #[diesel(sql_type = Text)]
    pub expiry_at: String,
    #[diesel(sql_type = Text)]
    pub reason: String,
}

#[derive(Serialize)]
struct PointGrant<'a> {
    campaign_id: i64,
    customer_uid: &'a str,
    amount: i64,
    expiry_at: &'a str,
    reason: &'a str,
}

impl PayoutKind for Point {
    const KIND: &'static str = "POINT";
    const TABLE: &'static str = "point_targets";
    const COLUMNS: &'static str = "id, event_id, customer_uid, amount, expiry_at, reason";
    const ENDPOINT: &'static str = "/v1/points/grants";

    type Row = PointRow;

    fn target_id(row: &PointRow) -> TargetId {
        TargetId(row.id)
    }

    fn idempotency_key(campaign: CampaignId, target: TargetId) -> IdempotencyKey {
        IdempotencyKey::for_row("point", campaign, target)
    }

    fn to_request(
        campaign: CampaignId,
        row: &PointRow,
        ctx: &ValidationContext,
    ) -> Result<GrantRequest, InvalidRow> {
        check_text("customer_uid", &row.customer_uid, 64)?;
        if row.amount <= 0 {
            return Err(InvalidRow::field(
                "amount",
                format!("amount {} is not positive", row.amount),
            ));
        }
        if row.amount > ctx.max_point_amount {
            return Err(InvalidRow::field(
                "amount",
                format!(
                    "amount {} is above the per-row maximum {}",
                    row.amount, ctx.max_point_amount
                ),
            ));
        }
        check_expiry(&row.expiry_at, ctx.expiry_offset, ctx.now)?;
        check_text("reason", &row.reason, 255)?;
        let target = TargetId(row.id);
        let body = PointGrant {
            campaign_id: campaign.0,
            customer_uid: &row.customer_uid,
            amount: row.amount,
            expiry_at: &row.expiry_at,
            reason: &row.reason,
        };
        GrantRequest::new(target, Self::ENDPOINT, Self::idempotency_key(campaign, target), &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use payout_core::kind::conformance::{self, Samples};

    fn row(
        campaign: CampaignId,
        id: i64,
        uid: &str,
        amount: i64,
        expiry: &str,
        reason: &str,
    ) -> PointRow {
        PointRow {
            id,
            event_id: campaign.0,
            customer_uid: uid.into(),
            amount,
            expiry_at: expiry.into(),
            reason: reason.into(),
        }
    }

    impl Samples for Point {
        fn valid(campaign: CampaignId, id: TargetId) -> PointRow {
            row(campaign, id.0, "u-1", 1500, "20271231235959", "winter sale")
        }

        fn invalid(campaign: CampaignId) -> Vec<(PointRow, &'static str)> {
            let e = "20271231235959";
            vec![
                (row(campaign, 1, "", 1, e, "r"), "invalid_customer_uid"),
                (row(campaign, 2, &"u".repeat(65), 1, e, "r"), "invalid_customer_uid"),
                (row(campaign, 3, "u", 0, e, "r"), "invalid_amount"),
                (row(campaign, 4, "u", -5, e, "r"), "invalid_amount"),
                (row(campaign, 5, "u", 1_000_001, e, "r"), "invalid_amount"),
                (row(campaign, 6, "u", 1, "2027123123595", "r"), "invalid_expiry_at"),
                (row(campaign, 7, "u", 1, "20270231000000", "r"), "invalid_expiry_at"),
                (row(campaign, 8, "u", 1, "20200101000000", "r"), "invalid_expiry_at"),
                (row(campaign, 9, "u", 1, e, ""), "invalid_reason"),
                (row(campaign, 10, "u", 1, e, &"r".repeat(256)), "invalid_reason"),
            ]
        }
    }

    #[test]
    fn point_passes_the_kind_conformance_suite() {
        assert_eq!(conformance::check::<Point>(), Ok(()));
    }

    #[test]
    fn the_body_is_the_money_api_point_grant() {
        let r = row(CampaignId(43), 1_234_567, "u-000001", 1500, "20271231235959", "winter sale");
        let req = Point::to_request(CampaignId(43), &r, &conformance::context()).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"campaign_id": 43, "customer_uid": "u-000001", "amount": 1500,
                "expiry_at": "20271231235959", "reason": "winter sale"})
        );
        assert_eq!(req.idempotency_key.as_str(), "point-43-1234567");
    }
}
