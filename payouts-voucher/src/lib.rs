//! Money vouchers: one `voucher_targets` row becomes one `POST /v1/vouchers/grants`.

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use payout_core::kind::check_text;
use payout_core::{
    CampaignId, GrantRequest, IdempotencyKey, InvalidRow, PayoutKind, TargetId, ValidationContext,
};
use serde::Serialize;

/// The voucher kind (`campaigns.kind = 'VOUCHER'`).
pub struct Voucher;

/// The columns of a voucher row the request is built from.
#[derive(Debug, Clone, QueryableByName)]
pub struct VoucherRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = BigInt)]
    pub event_id: i64,
    #[diesel(sql_type = Text)]
    pub customer_uid: String,
    #[diesel(sql_type = Text)]
    pub voucher_number: String,
    #[diesel(sql_type = Text)]
    pub reason: String,
}

#[derive(Serialize)]
struct VoucherGrant<'a> {
    campaign_id: i64,
    customer_uid: &'a str,
    voucher_number: &'a str,
    reason: &'a str,
}

impl PayoutKind for Voucher {
    const KIND: &'static str = "VOUCHER";
    const TABLE: &'static str = "voucher_targets";
    const COLUMNS: &'static str = "id, event_id, customer_uid, voucher_number, reason";
    const ENDPOINT: &'static str = "/v1/vouchers/grants";

    type Row = VoucherRow;

    fn target_id(row: &VoucherRow) -> TargetId {
        TargetId(row.id)
    }

    fn idempotency_key(campaign: CampaignId, target: TargetId) -> IdempotencyKey {
        IdempotencyKey::for_row("voucher", campaign, target)
    }

    fn to_request(
        campaign: CampaignId,
        row: &VoucherRow,
        _ctx: &ValidationContext,
    ) -> Result<GrantRequest, InvalidRow> {
        check_text("customer_uid", &row.customer_uid, 64)?;
        check_text("voucher_number", &row.voucher_number, 64)?;
        check_text("reason", &row.reason, 255)?;
        let target = TargetId(row.id);
        let body = VoucherGrant {
            campaign_id: campaign.0,
            customer_uid: &row.customer_uid,
            voucher_number: &row.voucher_number,
            reason: &row.reason,
        };
        GrantRequest::new(target, Self::ENDPOINT, Self::idempotency_key(campaign, target), &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use payout_core::kind::conformance::{self, Samples};

    fn row(campaign: CampaignId, id: i64, uid: &str, number: &str, reason: &str) -> VoucherRow {
        VoucherRow {
            id,
            event_id: campaign.0,
            customer_uid: uid.into(),
            voucher_number: number.into(),
            reason: reason.into(),
        }
    }

    impl Samples for Voucher {
        fn valid(campaign: CampaignId, id: TargetId) -> VoucherRow {
            row(campaign, id.0, "u-1", &format!("V-{}", id.0), "winter sale")
        }

        fn invalid(campaign: CampaignId) -> Vec<(VoucherRow, &'static str)> {
            vec![
                (row(campaign, 1, "", "V-1", "r"), "invalid_customer_uid"),
                (row(campaign, 2, &"u".repeat(65), "V-1", "r"), "invalid_customer_uid"),
                (row(campaign, 3, "u", "", "r"), "invalid_voucher_number"),
                (row(campaign, 4, "u", &"V".repeat(65), "r"), "invalid_voucher_number"),
                (row(campaign, 5, "u", "V-1", ""), "invalid_reason"),
                (row(campaign, 6, "u", "V-1", &"r".repeat(256)), "invalid_reason"),
            ]
        }
    }

    #[test]
    fn voucher_passes_the_kind_conformance_suite() {
        assert_eq!(conformance::check::<Voucher>(), Ok(()));
    }

    #[test]
    fn the_body_is_the_money_api_voucher_grant() {
        let r = row(CampaignId(42), 9, "u-000001", "V-42-000001", "winter sale");
        let req = Voucher::to_request(CampaignId(42), &r, &conformance::context()).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"campaign_id": 42, "customer_uid": "u-000001",
                "voucher_number": "V-42-000001", "reason": "winter sale"})
        );
        assert_eq!(req.idempotency_key.as_str(), "voucher-42-9");
        assert_eq!(req.endpoint, "/v1/vouchers/grants");
    }
}
