//! Routes, the grant request pipeline (see the module docs of `money_sim` for its order) and the
//! `/_sim/` admin endpoints.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use rand::Rng as _;
use serde::Serialize;

use super::FaultUpdate;
use super::OutageMode;
use super::body::{self, Endpoint};
use super::listener::ConnHandle;
use super::state::{Commit, Faults, KeyState, Shared};
use super::window::Admission;

type Sim = State<Arc<Shared>>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/vouchers/grants", post(vouchers))
        .route("/v1/points/grants", post(points))
        .route("/_sim/ledger", get(ledger))
        .route("/_sim/grants", get(grants))
        .route("/_sim/requests", get(requests))
        .route("/_sim/faults", get(faults).post(set_faults))
        .route("/_sim/reset", post(reset))
        .route("/_sim/health", get(health))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

/// A non-200 answer: `{"code": ..., "message": ...}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: Cow<'static, str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    fn invalid(message: impl Into<Cow<'static, str>>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    fn unavailable(message: &'static str) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody { code: self.code, message: &self.message });
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            (self.status, [(RETRY_AFTER, HeaderValue::from_static("1"))], body).into_response()
        } else {
            (self.status, body).into_response()
        }
    }
}

#[derive(Serialize)]
struct GrantOk<'a> {
    transaction_id: &'a str,
    replayed: bool,
}

/// How a grant request ends.
enum Reply {
    Granted {
        transaction_id: String,
        replayed: bool,
    },
    Failed(ApiError),
    /// The connection was closed without an answer.
    Dropped,
}

impl From<ApiError> for Reply {
    fn from(error: ApiError) -> Self {
        Reply::Failed(error)
    }
}

async fn vouchers(
    sim: Sim,
    ConnectInfo(conn): ConnectInfo<ConnHandle>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    grant(&sim.0, Endpoint::Vouchers, &conn, &headers, body).await
}

async fn points(
    sim: Sim,
    ConnectInfo(conn): ConnectInfo<ConnHandle>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    grant(&sim.0, Endpoint::Points, &conn, &headers, body).await
}

async fn grant(
    sim: &Shared,
    endpoint: Endpoint,
    conn: &ConnHandle,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
    let arrived = sim.arrival(conn.take_received());
    let ticket = sim.log_arrival(key, endpoint, arrived);
    match process(sim, endpoint, conn, headers, body, arrived).await {
        Reply::Granted { transaction_id, replayed } => {
            sim.log_answer(ticket, Some(200), replayed);
            Json(GrantOk { transaction_id: &transaction_id, replayed }).into_response()
        }
        Reply::Failed(error) => {
            sim.log_answer(ticket, Some(error.status.as_u16()), false);
            sim.record_status(error.status.as_u16());
            error.into_response()
        }
        Reply::Dropped => {
            sim.log_answer(ticket, None, false);
            // Never reaches the client: the socket is already shut down.
            ApiError::unavailable("connection dropped by the simulator").into_response()
        }
    }
}

/// What the fault stage decided for one request.
enum Fault {
    None,
    Fail503,
    /// Timeout share: hang, having granted first if `grant_first`.
    Hang {
        grant_first: bool,
    },
    Outage(OutageMode),
}

/// Mean latency with uniform jitter, clamped at 0.
fn latency(faults: &Faults) -> Duration {
    let jitter = faults.latency_jitter_ms;
    let ms = if jitter == 0 {
        faults.latency_ms
    } else {
        let offset = rand::rng().random_range(0..=jitter.saturating_mul(2));
        faults.latency_ms.saturating_add(offset).saturating_sub(jitter)
    };
    Duration::from_millis(ms)
}

/// Rolls the dice once per request; the thread-local RNG never lives across an `.await`.
fn decide(faults: &Faults, now: Instant) -> Fault {
    if let Some(mode) = faults.active_outage(now) {
        return Fault::Outage(mode);
    }
    let mut rng = rand::rng();
    if faults.fail_5xx_share > 0.0 && rng.random::<f64>() < faults.fail_5xx_share {
        Fault::Fail503
    } else if faults.timeout_share > 0.0 && rng.random::<f64>() < faults.timeout_share {
        Fault::Hang { grant_first: rng.random::<bool>() }
    } else {
        Fault::None
    }
}

async fn process(
    sim: &Shared,
    endpoint: Endpoint,
    conn: &ConnHandle,
    headers: &HeaderMap,
    raw: Result<Bytes, BytesRejection>,
    arrived: Duration,
) -> Reply {
    if sim.arrive(arrived) == Admission::RateLimited {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "more grant requests than the rate limit allows in the last second",
        )
        .into();
    }
    let presented = headers.get("x-api-key").map(HeaderValue::as_bytes);
    if !sim.api_key_matches(presented) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong X-Api-Key",
        )
        .into();
    }
    let key = match body::idempotency_key(headers) {
        Ok(key) => key,
        Err(message) => return ApiError::invalid(message).into(),
    };
    let raw = match raw {
        Ok(raw) => raw,
        Err(rejection) => {
            return ApiError::invalid(format!("the body could not be read: {rejection}")).into();
        }
    };
    let grant = match body::parse(endpoint, &raw) {
        Ok(grant) => grant,
        Err(message) => return ApiError::invalid(message).into(),
    };
    let generation = match sim.lookup(key, &grant) {
        KeyState::Fresh { generation } => generation,
        KeyState::Replay { transaction_id } => {
            return Reply::Granted { transaction_id, replayed: true };
        }
        KeyState::Reused => return key_reused().into(),
    };

    let mut faults = sim.current_faults();
    let latency = latency(&faults);
    if !latency.is_zero() {
        sim.sleep_unless_shutdown(latency).await;
        // An outage may have started (or ended) while this request waited.
        faults = sim.current_faults();
    }
    let fault = decide(&faults, Instant::now());
    let grant_then_hang = match fault {
        Fault::None => false,
        Fault::Hang { grant_first } => {
            if !grant_first {
                hang(sim).await;
                return ApiError::unavailable("the request timed out without granting").into();
            }
            true
        }
        Fault::Fail503 => return ApiError::unavailable("simulated server error").into(),
        Fault::Outage(OutageMode::Error503) => {
            return ApiError::unavailable("simulated outage").into();
        }
        Fault::Outage(OutageMode::Hang) => {
            hang(sim).await;
            return ApiError::unavailable("simulated outage: the request hung").into();
        }
        Fault::Outage(OutageMode::Reset) => {
            if conn.can_drop() {
                // Count first: the client may look at the ledger as soon as the socket closes.
                sim.record_dropped();
                conn.drop_connection();
                return Reply::Dropped;
            }
            // This connection cannot be closed from here: hang instead.
            hang(sim).await;
            return ApiError::unavailable("simulated outage: the request hung").into();
        }
    };

    let reply = business_and_grant(sim, generation, key, endpoint, &grant);
    if grant_then_hang {
        hang(sim).await;
    }
    reply
}

fn business_and_grant(
    sim: &Shared,
    generation: u64,
    key: &str,
    endpoint: Endpoint,
    grant: &body::GrantBody<'_>,
) -> Reply {
    if sim.customer_unknown(&grant.customer_uid) {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "customer_not_found",
            "no customer with this customer_uid",
        )
        .into();
    }
    match sim.commit(generation, key, endpoint, grant) {
        Commit::Granted { transaction_id } => Reply::Granted { transaction_id, replayed: false },
        Commit::Replay { transaction_id } => Reply::Granted { transaction_id, replayed: true },
        Commit::Reused => key_reused().into(),
        Commit::VoucherAlreadyIssued => ApiError::new(
            StatusCode::CONFLICT,
            "voucher_already_issued",
            "this voucher number was already granted under another idempotency key",
        )
        .into(),
        Commit::Stale => {
            ApiError::unavailable("the simulator was reset during this request").into()
        }
    }
}

fn key_reused() -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
        "this Idempotency-Key was used with a different body",
    )
}

async fn hang(sim: &Shared) {
    sim.record_hang();
    sim.sleep_unless_shutdown(sim.hang_duration()).await;
}

async fn ledger(sim: Sim) -> Response {
    Json(sim.ledger()).into_response()
}

async fn grants(sim: Sim) -> Response {
    Json(sim.grant_records()).into_response()
}

async fn requests(sim: Sim) -> Response {
    Json(sim.request_records()).into_response()
}

async fn faults(sim: Sim) -> Response {
    Json(sim.fault_state()).into_response()
}

/// Accepts the JSON body whatever its content type, so `curl -d '{...}'` works.
async fn set_faults(sim: Sim, raw: Result<Bytes, BytesRejection>) -> Response {
    let update = raw
        .map_err(|rejection| rejection.body_text())
        .and_then(|raw| serde_json::from_slice::<FaultUpdate>(&raw).map_err(|e| e.to_string()))
        .and_then(|update| update.validate().map(|()| update));
    match update {
        Ok(update) => {
            sim.apply_faults(&update);
            Json(sim.fault_state()).into_response()
        }
        Err(message) => {
            ApiError::invalid(format!("invalid fault update: {message}")).into_response()
        }
    }
}

async fn reset(sim: Sim) -> Response {
    sim.reset();
    Json(serde_json::json!({"reset": true})).into_response()
}

async fn health() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn unknown_route() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route").into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
    .into_response()
}
