//! The Money client: one grant request out, one classified outcome back.
//!
//! Classification follows the Money API contract (`money-api.md`): a success carries Money's
//! transaction id; a permanent rejection is never retried; a transient failure or an unknown
//! outcome is retried later with the same idempotency key and body; a 401 is a configuration
//! fault. The API key is held as a secret and marked sensitive on the wire; it never appears in
//! an error, a log line or the database.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::kind::GrantRequest;

/// How the client is built.
#[derive(Debug, Clone)]
pub struct MoneySettings {
    /// e.g. `http://money.internal:8080` (no trailing slash needed).
    pub base_url: String,
    pub api_key: SecretString,
    /// Total time for one request, connect to last byte (contract default 3 s).
    pub timeout: Duration,
    /// Idle connections kept for the next requests (see [`idle_connections_for`]); connections
    /// carrying a request are not counted.
    pub idle_connections: usize,
}

/// Time's worth of the rate limit kept as idle connections. Requests do not leave evenly: the
/// send log ([`crate::rate`]) lets a window carry what the one before it carried, so a stall of
/// the dispatcher comes back once a window as a gap and then a burst. At 1,000/s with Money
/// answering in 20 ± 10 ms, some 23 requests were in flight at a time, but once a second ~55 ms
/// went by with none sent, then ~80 left within 10 ms (80-83 in flight at the peak). A bound
/// below that peak closes and reopens the difference every second (64 idle: 25 new
/// connections a second).
pub const IDLE_CONNECTIONS_FOR: Duration = Duration::from_millis(128);

/// The fewest idle connections kept, whatever the limit.
pub const MIN_IDLE_CONNECTIONS: usize = 16;

/// Idle connections worth keeping at `rate_per_sec`: no more than `max_in_flight` (requests never
/// need more), and never fewer than [`MIN_IDLE_CONNECTIONS`].
///
/// The connection pool opens a connection whenever a request finds none idle, and keeps it
/// after the moment has passed; it hands out the most recently used first, and the once-a-window
/// bursts (see [`IDLE_CONNECTIONS_FOR`]) reach down to every connection the largest burst so far
/// needed, so none idles out. Kept without a bound, a campaign at 1,000/s with Money answering
/// in 20 ± 10 ms gathered ~15 more connections a minute for as long as it ran (some 300 and
/// 37.7 MiB of RSS at 2,000,000 rows, against 23 MiB at 120,000). A bound keeps what the rate
/// needs: the connections in use plus this many idle.
pub fn idle_connections_for(rate_per_sec: u32, max_in_flight: usize) -> usize {
    let per_rate = (u128::from(rate_per_sec) * IDLE_CONNECTIONS_FOR.as_millis()).div_ceil(1000);
    usize::try_from(per_rate)
        .unwrap_or(usize::MAX)
        .clamp(MIN_IDLE_CONNECTIONS, max_in_flight.max(MIN_IDLE_CONNECTIONS))
}

/// A grant Money made (or replayed) for the request's idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Granted {
    pub transaction_id: String,
    #[serde(default)]
    pub replayed: bool,
}

/// What to do about a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Money said the request itself is wrong: never retry, the row needs a person.
    Permanent,
    /// Money asked us to slow down; retry no sooner than the given delay (if it gave one).
    RetryAfter(Option<Duration>),
    /// Nothing was granted (5xx or no connection): retry later.
    Transient,
    /// The grant may or may not have happened (timeout, broken answer): retry later with the
    /// same key, which Money answers with a replay if it did.
    UnknownOutcome,
    /// Our configuration is wrong (bad API key): stop sending, a person must fix it.
    Configuration,
}

/// A grant request that did not end in a success.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("Money rejected the request: HTTP {status} {code}: {message}")]
    Rejected { status: u16, code: String, message: String },
    #[error("Money rejected the API key (HTTP 401): check money.api_key")]
    Unauthorized,
    #[error("Money rate-limited the request (HTTP {status})")]
    RateLimited { status: u16, retry_after: Option<Duration> },
    #[error("Money failed with HTTP {status} {code}")]
    Server { status: u16, code: String },
    #[error("could not connect to Money: {0}")]
    Connect(String),
    #[error("Money did not answer within the timeout")]
    Timeout,
    #[error("the exchange with Money broke off or was unreadable: {0}")]
    Broken(String),
}

impl MoneyError {
    pub fn disposition(&self) -> Disposition {
        match self {
            MoneyError::Rejected { .. } => Disposition::Permanent,
            MoneyError::RateLimited { retry_after, .. } => Disposition::RetryAfter(*retry_after),
            MoneyError::Server { .. } | MoneyError::Connect(_) => Disposition::Transient,
            MoneyError::Timeout | MoneyError::Broken(_) => Disposition::UnknownOutcome,
            MoneyError::Unauthorized => Disposition::Configuration,
        }
    }

    /// A short snake_case code for `last_error` and dead letters.
    pub fn code(&self) -> String {
        match self {
            MoneyError::Rejected { code, .. } => code.clone(),
            MoneyError::Unauthorized => "unauthorized".to_owned(),
            MoneyError::RateLimited { status, .. } => format!("http_{status}"),
            MoneyError::Server { status, .. } => format!("http_{status}"),
            MoneyError::Connect(_) => "connect_error".to_owned(),
            MoneyError::Timeout => "timeout".to_owned(),
            MoneyError::Broken(_) => "broken_exchange".to_owned(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Errors building the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("money.api_key is not a valid HTTP header value")]
    BadApiKey,
    #[error("money.base_url {0:?} is not an http(s) URL")]
    BadBaseUrl(String),
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
}

/// Installs the process-wide rustls crypto provider (ring); harmless when called twice.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Sends grant requests to Money. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct MoneyClient {
    http: reqwest::Client,
    base_url: String,
    /// Parsed endpoint URLs: parsing a URL string per request cost a noticeable share of the
    /// daemon's CPU at high rates.
    urls: Arc<RwLock<HashMap<&'static str, reqwest::Url>>>,
}

impl std::fmt::Debug for MoneyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoneyClient").field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

impl MoneyClient {
    pub fn new(settings: &MoneySettings) -> Result<MoneyClient, ClientError> {
        install_crypto_provider();
        let base_url = settings.base_url.trim_end_matches('/').to_owned();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(ClientError::BadBaseUrl(base_url));
        }
        let mut key = HeaderValue::from_str(settings.api_key.expose_secret())
            .map_err(|_| ClientError::BadApiKey)?;
        key.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", key);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(1)))
            .pool_max_idle_per_host(settings.idle_connections)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        Ok(MoneyClient { http, base_url, urls: Arc::default() })
    }

    fn url(&self, endpoint: &'static str) -> Result<reqwest::Url, MoneyError> {
        if let Some(url) = self.urls.read().ok().and_then(|m| m.get(endpoint).cloned()) {
            return Ok(url);
        }
        let url = reqwest::Url::parse(&format!("{}{endpoint}", self.base_url))
            .map_err(|e| MoneyError::Connect(format!("bad Money URL for {endpoint}: {e}")))?;
        if let Ok(mut m) = self.urls.write() {
            m.insert(endpoint, url.clone());
        }
        Ok(url)
    }

    /// Sends one grant request. Never retries by itself.
    pub async fn grant(&self, request: &GrantRequest) -> Result<Granted, MoneyError> {
        self.send(request, reqwest::Body::from(request.body.clone())).await
    }

    /// Sends one grant request like [`MoneyClient::grant`], and calls `departed` once with the
    /// moment the request leaves: when its connection takes the body to write it, right after
    /// the head, in the same turn (so after any wait for a connection, a handshake or a busy
    /// scheduler). Not called if the request never reaches a connection.
    pub async fn grant_noting_departure(
        &self,
        request: &GrantRequest,
        departed: Departure,
    ) -> Result<Granted, MoneyError> {
        let body = DepartureBody { data: Some(request.body.clone()), departed: Some(departed) };
        self.send(request, reqwest::Body::wrap(body)).await
    }

    async fn send(
        &self,
        request: &GrantRequest,
        body: reqwest::Body,
    ) -> Result<Granted, MoneyError> {
        let url = self.url(request.endpoint)?;
        let response = self
            .http
            .post(url)
            .header("idempotency-key", request.idempotency_key.as_str())
            .body(body)
            .send()
            .await
            .map_err(classify_transport)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response.bytes().await.map_err(classify_transport)?;
        classify(status, retry_after, &body)
    }
}

/// Told when a request leaves (see [`MoneyClient::grant_noting_departure`]).
pub type Departure = Box<dyn FnOnce(Instant) + Send + Sync>;

/// A request body that notes when its connection first asks for it. hyper writes a request's
/// head, asks for its body and writes both in one turn of the connection's task, so that moment
/// is when the request goes on the wire, to within one write.
struct DepartureBody {
    data: Option<Bytes>,
    departed: Option<Departure>,
}

impl http_body::Body for DepartureBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(departed) = this.departed.take() {
            departed(Instant::now());
        }
        Poll::Ready(this.data.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    /// Exact, so the request carries a `Content-Length` as with a plain body.
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

fn classify_transport(e: reqwest::Error) -> MoneyError {
    if e.is_timeout() {
        MoneyError::Timeout
    } else if e.is_connect() {
        MoneyError::Connect(without_url(&e))
    } else {
        MoneyError::Broken(without_url(&e))
    }
}

/// reqwest errors carry the URL; ours carries no secret, but keep messages short and stable.
fn without_url(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    if let Some(url) = e.url() {
        msg = msg.replace(url.as_str(), "");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Maps Money's answer to an outcome, following the error table of `money-api.md`.
pub fn classify(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<Granted, MoneyError> {
    let error_body = || serde_json::from_slice::<ErrorBody>(body).ok();
    match status {
        200 => match serde_json::from_slice::<Granted>(body) {
            Ok(g) if !g.transaction_id.is_empty() => Ok(g),
            Ok(_) => Err(MoneyError::Broken("200 without a transaction_id".to_owned())),
            Err(e) => Err(MoneyError::Broken(format!("unreadable 200 answer: {e}"))),
        },
        401 => Err(MoneyError::Unauthorized),
        408 | 429 => Err(MoneyError::RateLimited { status, retry_after }),
        400..=499 => {
            let b = error_body();
            Err(MoneyError::Rejected {
                status,
                code: b
                    .as_ref()
                    .map(|b| b.code.clone())
                    .filter(|c| !c.is_empty())
                    .unwrap_or_else(|| format!("http_{status}")),
                message: truncate(b.map(|b| b.message).unwrap_or_default(), 400),
            })
        }
        500..=599 => Err(MoneyError::Server {
            status,
            code: error_body().map(|b| b.code).filter(|c| !c.is_empty()).unwrap_or_default(),
        }),
        // 1xx/3xx and other surprises: we cannot tell whether a grant happened.
        _ => Err(MoneyError::Broken(format!("unexpected HTTP status {status}"))),
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_connections_follow_the_rate_within_bounds() {
        // 128 ms of 1,000/s: more than the ~80 requests of a window's burst.
        assert_eq!(idle_connections_for(1000, 512), 128);
        assert_eq!(idle_connections_for(2500, 512), 320);
        // A slow limit still keeps a few; no limit keeps what may be in flight.
        assert_eq!(idle_connections_for(10, 512), MIN_IDLE_CONNECTIONS);
        assert_eq!(idle_connections_for(1_000_000, 512), 512);
        assert_eq!(idle_connections_for(u32::MAX, 300), 300);
        assert_eq!(idle_connections_for(1000, 1), MIN_IDLE_CONNECTIONS);
    }

    #[test]
    fn answers_are_classified_as_the_contract_says() {
        let ok = classify(200, None, br#"{"transaction_id":"tx-1","replayed":true}"#);
        assert_eq!(ok, Ok(Granted { transaction_id: "tx-1".into(), replayed: true }));
        let table: [(u16, &[u8], Disposition); 11] = [
            (400, br#"{"code":"invalid_request","message":"bad"}"#, Disposition::Permanent),
            (404, br#"{"code":"customer_not_found"}"#, Disposition::Permanent),
            (409, br#"{"code":"voucher_already_issued"}"#, Disposition::Permanent),
            (422, br#"{"code":"idempotency_key_reused"}"#, Disposition::Permanent),
            (401, br#"{"code":"unauthorized"}"#, Disposition::Configuration),
            (408, b"", Disposition::RetryAfter(None)),
            (429, br#"{"code":"rate_limited"}"#, Disposition::RetryAfter(None)),
            (500, b"oops", Disposition::Transient),
            (503, br#"{"code":"unavailable"}"#, Disposition::Transient),
            (200, b"not json", Disposition::UnknownOutcome),
            (302, b"", Disposition::UnknownOutcome),
        ];
        for (status, body, want) in table {
            let got = classify(status, None, body).map_err(|e| e.disposition());
            assert_eq!(got, Err(want), "HTTP {status}");
        }
    }

    #[test]
    fn rejection_codes_come_from_the_body() {
        let e = classify(404, None, br#"{"code":"customer_not_found","message":"no"}"#);
        assert_eq!(e.map_err(|e| e.code()), Err("customer_not_found".to_owned()));
        let e = classify(418, None, b"");
        assert_eq!(e.map_err(|e| e.code()), Err("http_418".to_owned()));
    }

    #[test]
    fn retry_after_is_kept() {
        let e = classify(429, Some(Duration::from_secs(2)), b"");
        assert_eq!(
            e.map_err(|e| e.disposition()),
            Err(Disposition::RetryAfter(Some(Duration::from_secs(2))))
        );
    }
}
