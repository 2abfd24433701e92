//! Grant request bodies: strict parsing and validation per the Money contract, and the
//! canonical form used to compare bodies (idempotency and duplicate detection).

use std::borrow::Cow;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

const MAX_UID_CHARS: usize = 64;
const MAX_VOUCHER_NUMBER_CHARS: usize = 64;
const MAX_REASON_CHARS: usize = 255;
const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Vouchers,
    Points,
}

impl Endpoint {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Endpoint::Vouchers => "vouchers",
            Endpoint::Points => "points",
        }
    }
}

// Strings borrow from the request body when they contain no escapes. Field order here is the
// canonical order; unknown fields are rejected so a client typo cannot pass unnoticed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VoucherBody<'a> {
    campaign_id: i64,
    #[serde(borrow)]
    customer_uid: Cow<'a, str>,
    #[serde(borrow)]
    voucher_number: Cow<'a, str>,
    #[serde(borrow)]
    reason: Cow<'a, str>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PointBody<'a> {
    campaign_id: i64,
    #[serde(borrow)]
    customer_uid: Cow<'a, str>,
    amount: i64,
    #[serde(borrow)]
    expiry_at: Cow<'a, str>,
    #[serde(borrow)]
    reason: Cow<'a, str>,
}

/// A validated grant request body.
#[derive(Debug)]
pub(crate) struct GrantBody<'a> {
    pub(crate) campaign_id: i64,
    pub(crate) customer_uid: Cow<'a, str>,
    /// Set for vouchers only.
    pub(crate) voucher_number: Option<Cow<'a, str>>,
    /// The body re-serialised with every field in a fixed order. Voucher and point bodies have
    /// different field sets, so the canonical text also identifies the endpoint.
    pub(crate) canonical: String,
}

/// Parses and validates a body; the error is the message of a `400 invalid_request`.
pub(crate) fn parse(endpoint: Endpoint, raw: &[u8]) -> Result<GrantBody<'_>, String> {
    match endpoint {
        Endpoint::Vouchers => {
            let body: VoucherBody<'_> = serde_json::from_slice(raw)
                .map_err(|e| format!("the body is not a valid voucher grant: {e}"))?;
            check_text("customer_uid", &body.customer_uid, MAX_UID_CHARS)?;
            check_text("voucher_number", &body.voucher_number, MAX_VOUCHER_NUMBER_CHARS)?;
            check_text("reason", &body.reason, MAX_REASON_CHARS)?;
            let canonical = canonical_json(&body)?;
            Ok(GrantBody {
                campaign_id: body.campaign_id,
                customer_uid: body.customer_uid,
                voucher_number: Some(body.voucher_number),
                canonical,
            })
        }
        Endpoint::Points => {
            let body: PointBody<'_> = serde_json::from_slice(raw)
                .map_err(|e| format!("the body is not a valid point grant: {e}"))?;
            check_text("customer_uid", &body.customer_uid, MAX_UID_CHARS)?;
            if body.amount <= 0 {
                return Err(format!("amount must be positive, got {}", body.amount));
            }
            if !is_valid_expiry(&body.expiry_at) {
                return Err(
                    "expiry_at must be a real date-time written as 14 digits yyyyMMddHHmmss"
                        .to_owned(),
                );
            }
            check_text("reason", &body.reason, MAX_REASON_CHARS)?;
            let canonical = canonical_json(&body)?;
            Ok(GrantBody {
                campaign_id: body.campaign_id,
                customer_uid: body.customer_uid,
                voucher_number: None,
                canonical,
            })
        }
    }
}

fn canonical_json<T: Serialize>(body: &T) -> Result<String, String> {
    serde_json::to_string(body).map_err(|e| format!("the body cannot be re-serialised: {e}"))
}

fn check_text(field: &str, value: &str, max_chars: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    let chars = value.chars().count();
    if chars > max_chars {
        return Err(format!("{field} must be at most {max_chars} characters, got {chars}"));
    }
    Ok(())
}

/// `yyyyMMddHHmmss`: exactly 14 ASCII digits naming a real calendar date and time of day
/// (no leap second).
fn is_valid_expiry(value: &str) -> bool {
    if value.len() != 14 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let field = |from: usize, to: usize| value.get(from..to).and_then(|s| s.parse::<u32>().ok());
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) =
        (field(0, 4), field(4, 6), field(6, 8), field(8, 10), field(10, 12), field(12, 14))
    else {
        return false;
    };
    let Ok(year) = i32::try_from(year) else {
        return false;
    };
    NaiveDate::from_ymd_opt(year, month, day)
        .and_then(|date| date.and_hms_opt(hour, minute, second))
        .is_some()
}

/// Exactly one `Idempotency-Key` of 1..=128 printable ASCII characters (space to `~`).
pub(crate) fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<&str, &'static str> {
    let mut values = headers.get_all("idempotency-key").iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err("exactly one Idempotency-Key header is required");
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err("Idempotency-Key must be 1 to 128 characters");
    }
    if !bytes.iter().all(|b| (b' '..=b'~').contains(b)) {
        return Err("Idempotency-Key must be printable ASCII");
    }
    value.to_str().map_err(|_| "Idempotency-Key must be printable ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_must_be_a_real_date_time_in_14_digits() {
        let cases = [
            ("20271231235959", true),
            ("20240229000000", true),
            ("00010101000000", true),
            ("2027123123595", false),
            ("202712312359590", false),
            ("20270231000000", false),
            ("20230229000000", false),
            ("20271301000000", false),
            ("20271200000000", false),
            ("20271231240000", false),
            ("20271231236000", false),
            ("20271231235960", false),
            ("2027-12-31T235", false),
            ("+0271231235959", false),
            ("２０２７1231235959", false),
            ("", false),
        ];
        for (value, valid) in cases {
            assert_eq!(is_valid_expiry(value), valid, "{value:?}");
        }
    }

    #[test]
    fn canonical_text_ignores_key_order_and_whitespace() -> Result<(), String> {
        let a = parse(
            Endpoint::Points,
            br#"{"campaign_id":1,"customer_uid":"u","amount":5,"expiry_at":"20271231235959","reason":"r"}"#,
        )?;
        let b = parse(
            Endpoint::Points,
            br#" { "reason" : "r", "expiry_at":"20271231235959", "amount":5, "customer_uid":"\u0075", "campaign_id":1 } "#,
        )?;
        assert_eq!(a.canonical, b.canonical);
        Ok(())
    }

    #[test]
    fn invalid_bodies_are_rejected() {
        let vouchers: &[&[u8]] = &[
            b"",
            b"{",
            b"[]",
            br#"{"campaign_id":1,"customer_uid":"u","voucher_number":"v"}"#,
            br#"{"campaign_id":"1","customer_uid":"u","voucher_number":"v","reason":"r"}"#,
            br#"{"campaign_id":1.5,"customer_uid":"u","voucher_number":"v","reason":"r"}"#,
            br#"{"campaign_id":1,"customer_uid":null,"voucher_number":"v","reason":"r"}"#,
            br#"{"campaign_id":1,"customer_uid":"","voucher_number":"v","reason":"r"}"#,
            br#"{"campaign_id":1,"customer_uid":"u","voucher_number":"","reason":"r"}"#,
            br#"{"campaign_id":1,"customer_uid":"u","voucher_number":"v","reason":""}"#,
            br#"{"campaign_id":1,"customer_uid":"u","voucher_number":"v","reason":"r","x":1}"#,
            br#"{"campaign_id":1,"customer_uid":"u","voucher_number":"v","reason":"r","amount":1}"#,
        ];
        for raw in vouchers {
            assert!(parse(Endpoint::Vouchers, raw).is_err(), "{}", String::from_utf8_lossy(raw));
        }
        let points: &[&[u8]] = &[
            br#"{"campaign_id":1,"customer_uid":"u","amount":0,"expiry_at":"20271231235959","reason":"r"}"#,
            br#"{"campaign_id":1,"customer_uid":"u","amount":-1,"expiry_at":"20271231235959","reason":"r"}"#,
            br#"{"campaign_id":1,"customer_uid":"u","amount":1.0,"expiry_at":"20271231235959","reason":"r"}"#,
            br#"{"campaign_id":1,"customer_uid":"u","amount":1,"expiry_at":20271231235959,"reason":"r"}"#,
            br#"{"campaign_id":1,"customer_uid":"u","amount":1,"expiry_at":"20270231000000","reason":"r"}"#,
            br#"{"campaign_id":1,"customer_uid":"u","amount":1,"reason":"r"}"#,
            br#"{"campaign_id":1,"customer_uid":"u","voucher_number":"v","reason":"r"}"#,
        ];
        for raw in points {
            assert!(parse(Endpoint::Points, raw).is_err(), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn text_limits_count_characters_not_bytes() {
        assert!(check_text("f", &"é".repeat(64), 64).is_ok());
        assert!(check_text("f", &"é".repeat(65), 64).is_err());
    }
}
