//! The Money client against money-sim: when a request is noted as having left.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use payout_core::kind::{GrantRequest, IdempotencyKey};
use payout_core::money::{MoneyClient, MoneySettings};
use payout_core::{CampaignId, TargetId};
use secrecy::SecretString;
use serde_json::json;

use payout_tests::money_sim::SimConfig;

use crate::support::*;

fn client(base_url: &str) -> anyhow::Result<MoneyClient> {
    Ok(MoneyClient::new(&MoneySettings {
        base_url: base_url.to_owned(),
        api_key: SecretString::from(SIM_KEY),
        timeout: Duration::from_secs(3),
        idle_connections: 4,
    })?)
}

fn request(target: i64) -> anyhow::Result<GrantRequest> {
    let body = json!({
        "campaign_id": 7,
        "customer_uid": format!("u-{target}"),
        "amount": 10,
        "expiry_at": "20271231235959",
        "reason": "winter sale",
    });
    let key = IdempotencyKey::for_row("point", CampaignId(7), TargetId(target));
    Ok(GrantRequest::new(TargetId(target), "/v1/points/grants", key, &body)?)
}

/// Departure times noted so far.
fn recorder() -> (Arc<Mutex<Vec<Instant>>>, impl Fn() -> payout_core::money::Departure) {
    let noted = Arc::new(Mutex::new(Vec::new()));
    let make = {
        let noted = noted.clone();
        move || -> payout_core::money::Departure {
            let noted = noted.clone();
            Box::new(move |at| noted.lock().unwrap_or_else(PoisonError::into_inner).push(at))
        }
    };
    (noted, make)
}

#[tokio::test]
async fn a_request_notes_its_departure_once_between_the_call_and_the_answer() -> anyhow::Result<()>
{
    let sim = sim(SimConfig { latency_ms: 30, ..sim_config() }).await?;
    let money = client(&sim.base_url())?;
    let (noted, departure) = recorder();
    for target in 1..=3 {
        let before = Instant::now();
        let granted = money.grant_noting_departure(&request(target)?, departure()).await?;
        let after = Instant::now();
        assert!(!granted.transaction_id.is_empty());
        let noted = noted.lock().unwrap_or_else(PoisonError::into_inner);
        assert_eq!(noted.len(), target as usize, "one departure per request");
        let left = noted[target as usize - 1];
        assert!(left >= before, "noted before the call");
        // money-sim answers 30 ms after the request arrives: the request left before that.
        assert!(after.duration_since(left) >= Duration::from_millis(25), "noted after the answer");
    }
    // The body went out whole, with its length: each was granted once, as a plain body is.
    let ledger = sim.ledger();
    assert_eq!((ledger.grants_total, ledger.duplicate_grants), (3, 0), "{ledger:?}");
    assert!(money.grant(&request(1)?).await?.replayed);
    Ok(())
}

#[tokio::test]
async fn a_request_that_never_reaches_a_connection_notes_no_departure() -> anyhow::Result<()> {
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let money = client(&format!("http://127.0.0.1:{port}"))?;
    let (noted, departure) = recorder();
    let result = money.grant_noting_departure(&request(1)?, departure()).await;
    assert!(result.is_err(), "{result:?}");
    assert!(noted.lock().unwrap_or_else(PoisonError::into_inner).is_empty());
    Ok(())
}

#[tokio::test]
async fn connections_opened_for_a_peak_are_closed_down_to_the_idle_bound() -> anyhow::Result<()> {
    let sim = sim(SimConfig { latency_ms: 50, ..sim_config() }).await?;
    let money = client(&sim.base_url())?;
    // 32 requests at once need 32 connections.
    let mut set = tokio::task::JoinSet::new();
    for target in 1..=32 {
        let (money, request) = (money.clone(), request(target)?);
        set.spawn(async move { money.grant(&request).await });
    }
    while let Some(answer) = set.join_next().await {
        assert!(!answer??.transaction_id.is_empty());
    }
    let ledger = sim.ledger();
    assert!(ledger.connections_open_peak >= 32, "{ledger:?}");
    // Once the answers are in, the client keeps 4 of them (`idle_connections`) and closes the
    // rest, rather than keeping them for a minute.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.ledger().connections_open > 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ledger = sim.ledger();
    assert!(ledger.connections_open <= 4, "{ledger:?}");
    // The next requests, one at a time, go over the kept connections.
    let accepted = ledger.connections_accepted_total;
    for target in 33..=36 {
        money.grant(&request(target)?).await?;
    }
    let ledger = sim.ledger();
    assert_eq!(ledger.connections_accepted_total, accepted, "{ledger:?}");
    assert_eq!((ledger.grants_total, ledger.duplicate_grants), (36, 0), "{ledger:?}");
    Ok(())
}
