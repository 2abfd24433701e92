//! Slack alerts: delivery of the alert outbox, and the failure-rate watcher that feeds it.
//!
//! The outbox is `campaign_events` itself. [`repo::record_event`] writes an event named in
//! [`repo::ALERT_EVENTS`] with `alert_state = 'PENDING'`, in the same transaction as the state
//! change it records, so an alert exists exactly when its cause was committed. [`AlertDelivery`]
//! later posts each pending alert to the Slack incoming webhook (`{"text": "..."}`) and marks it
//! `SENT`; an attempt that fails is retried after `min(2^(attempts - 1) s, 5 min)`, forever, and
//! the alert survives restarts because its state is in MySQL. Without a webhook an alert is
//! written to the log and marked `LOGGED`.
//!
//! Slack never slows payouts: delivery is its own scheduled job with its own HTTP client (a 5 s
//! timeout), and no database transaction or pooled connection is held while a request is out.
//! Before sending, an alert is claimed in a short transaction (`FOR UPDATE SKIP LOCKED`) that
//! counts the attempt and pushes `next_alert_at` out by a lease, so a second daemon instance
//! does not send it too; a process that dies mid-send leaves it to be retried after the lease.
//! Delivery is at least once: a crash between Slack's answer and the `SENT` mark resends it.
//!
//! The webhook URL is a secret: it is never logged, and errors are stripped of it (reqwest puts
//! the URL into its error messages).
//!
//! [`FailureRateWatcher`] computes each RUNNING campaign's failure rate, (FAILED + DEAD) / all
//! rows × 100, and records `FAILURE_RATE_HIGH` once per crossing of the threshold: raising it
//! clears `campaigns.failure_alert_armed` in the same transaction, and the flag is set again only
//! when the rate falls back to the threshold or below.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{NaiveDateTime, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Datetime, Integer, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl};
use secrecy::{ExposeSecret, SecretString};
use tracing::{info, warn};

use crate::db::{DbError, DbPool, conn};
use crate::domain::{CampaignId, TargetStatus};
use crate::kind::KindRegistry;
use crate::money::ClientError;
use crate::repo;

type QResult<T> = Result<T, diesel::result::Error>;

/// Time allowed for one webhook request, connect to last byte.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between two delivery attempts of one alert.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(5 * 60);
/// Alerts handled per [`AlertDelivery::tick`] at most.
const BATCH: usize = 20;
/// A tick starts no new request after this long, so that a slow Slack cannot keep the job
/// running for many periods (the watchdog counts it as stalled after about 8 s).
const TICK_BUDGET: Duration = Duration::from_secs(2);
/// How long a claimed alert is left alone by other instances: above [`SEND_TIMEOUT`] plus the
/// database writes around it.
const LEASE_SECS: i64 = 30;
/// Longest `last_alert_error` stored (the column is VARCHAR(512)).
const MAX_ERROR_CHARS: usize = 500;
/// An alert delivered this long after its event says when the event happened.
const LATE_AFTER_SECS: i64 = 60;

// ---------------------------------------------------------------------------------------------
// What an alert says

/// The events that are alerts (the names in [`repo::ALERT_EVENTS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    /// The circuit breaker opened and paused the campaign it was serving (urgent).
    BreakerOpened,
    /// The breaker's probe succeeded (or there was nothing to probe): paused campaigns resume.
    BreakerClosed,
    /// Every row is SUCCEEDED or DEAD.
    Completed,
    /// Money answered 401: the API key is wrong; the campaign was paused (urgent).
    ConfigFault,
    /// The failure rate crossed the threshold.
    FailureRateHigh,
}

impl AlertKind {
    pub const ALL: [AlertKind; 5] = [
        AlertKind::BreakerOpened,
        AlertKind::BreakerClosed,
        AlertKind::Completed,
        AlertKind::ConfigFault,
        AlertKind::FailureRateHigh,
    ];

    /// The `campaign_events.event` name.
    pub fn event(self) -> &'static str {
        match self {
            AlertKind::BreakerOpened => "BREAKER_OPENED",
            AlertKind::BreakerClosed => "BREAKER_CLOSED",
            AlertKind::Completed => "COMPLETED",
            AlertKind::ConfigFault => "CONFIG_FAULT",
            AlertKind::FailureRateHigh => "FAILURE_RATE_HIGH",
        }
    }

    pub fn parse(event: &str) -> Option<AlertKind> {
        AlertKind::ALL.into_iter().find(|k| k.event() == event)
    }

    /// Payouts stopped and a person must act (or at least know at once).
    pub fn is_urgent(self) -> bool {
        match self {
            AlertKind::BreakerOpened | AlertKind::ConfigFault => true,
            AlertKind::BreakerClosed | AlertKind::Completed | AlertKind::FailureRateHigh => false,
        }
    }
}

/// One alert with what its message needs, read from the outbox and the campaign.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// `campaign_events.id`.
    pub id: i64,
    /// The event name; [`AlertKind::parse`] knows it unless someone wrote the row by hand.
    pub event: String,
    pub campaign_id: Option<i64>,
    pub campaign_name: Option<String>,
    /// The event's `detail` JSON (`Null` when absent or not JSON).
    pub detail: serde_json::Value,
    /// When the event was recorded (UTC).
    pub created_at: NaiveDateTime,
    pub started_at: Option<NaiveDateTime>,
    pub completed_at: Option<NaiveDateTime>,
    /// Unresolved dead letters of the campaign (read for `COMPLETED` only).
    pub dead_letters: Option<u64>,
}

impl Alert {
    pub fn kind(&self) -> Option<AlertKind> {
        AlertKind::parse(&self.event)
    }

    pub fn is_urgent(&self) -> bool {
        self.kind().is_some_and(AlertKind::is_urgent)
    }
}

/// The Slack message of an alert (one line of Slack `mrkdwn`), as of `now` (UTC).
pub fn message(alert: &Alert, now: NaiveDateTime) -> String {
    let campaign = campaign_label(alert);
    let detail = &alert.detail;
    let mut text = match alert.kind() {
        Some(AlertKind::BreakerOpened) => {
            let last = detail_str(detail, "last_error")
                .map(|e| format!(" (last error: {})", escape(e)))
                .unwrap_or_default();
            format!(
                ":rotating_light: URGENT: {} was paused by the circuit breaker: Money failed \
                 repeatedly{last}. payoutd probes Money again and resumes the campaign by itself \
                 once Money answers; if it stays paused, check Money.",
                campaign.as_deref().unwrap_or("a campaign")
            )
        }
        Some(AlertKind::BreakerClosed) => {
            let why = detail_str(detail, "reason")
                .map(|r| format!(" ({})", escape(r)))
                .unwrap_or_default();
            let probe = campaign
                .map(|c| format!(" The probe request was sent for {c}."))
                .unwrap_or_default();
            format!(
                ":white_check_mark: Circuit breaker closed: Money answers again{why}. Campaigns \
                 the breaker paused resume.{probe}"
            )
        }
        Some(AlertKind::Completed) => {
            let what = capitalised(campaign.as_deref().unwrap_or("a campaign"));
            let took = match (alert.started_at, alert.completed_at) {
                (Some(from), Some(to)) if to >= from => {
                    format!(" in {}", human_duration((to - from).to_std().unwrap_or_default()))
                }
                _ => String::new(),
            };
            let counts = status_counts(detail);
            let total: u64 = counts.iter().map(|(_, n)| n).sum();
            let listed = counts
                .iter()
                .map(|(status, n)| format!("{} {}", thousands(*n), status_words(*status)))
                .collect::<Vec<_>>()
                .join(", ");
            let counts = if listed.is_empty() {
                String::new()
            } else {
                format!(": {listed} of {} rows", thousands(total))
            };
            let letters = match alert.dead_letters {
                Some(0) => " No dead letters.".to_owned(),
                Some(1) => " 1 dead letter to review (payoutd dead-letters list).".to_owned(),
                Some(n) => {
                    format!(" {} dead letters to review (payoutd dead-letters list).", thousands(n))
                }
                None => String::new(),
            };
            format!(":checkered_flag: {what} completed{took}{counts}.{letters}")
        }
        Some(AlertKind::ConfigFault) => {
            let resume = alert
                .campaign_id
                .map(|id| format!(" (payoutd campaign resume {id})"))
                .unwrap_or_default();
            format!(
                ":rotating_light: URGENT: {} was paused: Money rejected the API key (HTTP 401). \
                 Fix money.api_key, then resume the campaign{resume}.",
                campaign.as_deref().unwrap_or("a campaign")
            )
        }
        Some(AlertKind::FailureRateHigh) => {
            let what = capitalised(campaign.as_deref().unwrap_or("a campaign"));
            let rate = detail_f64(detail, "rate_pct").unwrap_or(0.0);
            let threshold = detail_f64(detail, "threshold_pct").unwrap_or(0.0);
            let n = |key| thousands(detail_u64(detail, key).unwrap_or(0));
            format!(
                ":warning: {what}: failure rate {rate:.2} % is above the {threshold:.2} % \
                 threshold ({} failed, {} dead of {} rows). The campaign keeps running; this \
                 alert repeats only after the rate falls back to {threshold:.2} % or below.",
                n("failed"),
                n("dead"),
                n("total")
            )
        }
        None => format!(
            ":information_source: payoutd event {}{}: {}",
            escape(&alert.event),
            campaign.map(|c| format!(" for {c}")).unwrap_or_default(),
            escape(&alert.detail.to_string())
        ),
    };
    if (now - alert.created_at).num_seconds() > LATE_AFTER_SECS {
        text.push_str(&format!(" (recorded {} UTC)", alert.created_at.format("%Y-%m-%d %H:%M:%S")));
    }
    text
}

/// `campaign 43 "winter points"`, or `None` for an event without a campaign.
fn campaign_label(alert: &Alert) -> Option<String> {
    let id = alert.campaign_id?;
    Some(match alert.campaign_name.as_deref() {
        Some(name) => format!("campaign {id} \"{}\"", escape(name)),
        None => format!("campaign {id}"),
    })
}

fn capitalised(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Slack's three control characters in text that is not ours (names, error messages).
fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn detail_str<'a>(detail: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    detail.get(key).and_then(serde_json::Value::as_str).filter(|s| !s.is_empty())
}

fn detail_f64(detail: &serde_json::Value, key: &str) -> Option<f64> {
    detail.get(key).and_then(serde_json::Value::as_f64)
}

fn detail_u64(detail: &serde_json::Value, key: &str) -> Option<u64> {
    detail.get(key).and_then(serde_json::Value::as_u64)
}

/// The per-status counts of a `COMPLETED` detail (`{"DEAD": 20, "SUCCEEDED": 380}`), in
/// status order, zero counts left out.
fn status_counts(detail: &serde_json::Value) -> Vec<(TargetStatus, u64)> {
    TargetStatus::ALL
        .into_iter()
        .filter_map(|s| detail_u64(detail, s.as_str()).filter(|n| *n > 0).map(|n| (s, n)))
        .collect()
}

fn status_words(status: TargetStatus) -> &'static str {
    match status {
        TargetStatus::Pending => "pending",
        TargetStatus::InFlight => "in flight",
        TargetStatus::Succeeded => "succeeded",
        TargetStatus::Failed => "failed",
        TargetStatus::Dead => "dead",
    }
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `4.2 s`, `3 min 05 s`, `2 h 03 min 05 s`.
fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 {
        format!("{:.1} s", d.as_secs_f64())
    } else if secs < 3600 {
        format!("{} min {:02} s", secs / 60, secs % 60)
    } else {
        format!("{} h {:02} min {:02} s", secs / 3600, secs % 3600 / 60, secs % 60)
    }
}

/// The wait before the next attempt after `attempts` attempts (at least 1) failed:
/// 1 s, 2 s, 4 s, ... up to [`MAX_RETRY_DELAY`].
pub fn retry_delay(attempts: i32) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1)).unwrap_or(0).min(20);
    Duration::from_secs(1u64 << exponent).min(MAX_RETRY_DELAY)
}

/// Removes the webhook URL (and its path, which holds the secret token) from a message.
fn scrub(message: &str, url: &str) -> String {
    let out = message.replace(url, "***");
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")).unwrap_or(url);
    match rest.find('/').map(|slash| &rest[slash..]) {
        Some(path) if path.len() > 1 => out.replace(path, "/***"),
        Some(_) | None => out,
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

/// A reqwest error without its URL, with its causes (`error sending request: client error
/// (Connect): tcp connect error: Connection refused`).
fn describe(error: reqwest::Error) -> String {
    let timed_out = error.is_timeout();
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if timed_out { format!("timed out after {} s ({text})", SEND_TIMEOUT.as_secs()) } else { text }
}

// ---------------------------------------------------------------------------------------------
// Delivery

/// Delivers pending alerts to Slack (or to the log when no webhook is configured).
pub struct AlertDelivery {
    pool: DbPool,
    webhook: Option<SecretString>,
    client: reqwest::Client,
}

impl std::fmt::Debug for AlertDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertDelivery")
            .field("webhook", &self.webhook.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

/// A claimed alert: the attempt count includes the attempt just claimed.
struct Claimed {
    alert: Alert,
    attempts: i32,
}

/// What became of one delivery attempt.
enum Mark {
    Sent,
    Logged,
    Retry { after: Duration, error: String },
}

impl AlertDelivery {
    /// `webhook`: the Slack incoming-webhook URL; `None` logs alerts instead.
    pub fn new(pool: DbPool, webhook: Option<SecretString>) -> Result<AlertDelivery, ClientError> {
        crate::money::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(SEND_TIMEOUT)
            .connect_timeout(SEND_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(1)
            .build()
            .map_err(|e| ClientError::Build(describe(e)))?;
        Ok(AlertDelivery { pool, webhook, client })
    }

    pub fn has_webhook(&self) -> bool {
        self.webhook.is_some()
    }

    /// Handles due alerts, oldest due first: at most 20, starting none after 2 s, and stopping
    /// at the first failed delivery (Slack is likely down; each alert waits its own backoff).
    /// Returns how many were sent or logged.
    pub async fn tick(&self) -> Result<usize, DbError> {
        let started = Instant::now();
        let mut handled = 0;
        for _ in 0..BATCH {
            if started.elapsed() >= TICK_BUDGET {
                break;
            }
            // The connection goes back to the pool before the request is sent.
            let claimed = {
                let mut c = conn(&self.pool).await?;
                claim_next(&mut c).await?
            };
            let Some(Claimed { alert, attempts }) = claimed else { break };
            let text = message(&alert, Utc::now().naive_utc());
            let Some(webhook) = &self.webhook else {
                let (id, event, campaign) = (alert.id, &alert.event, alert.campaign_id);
                if alert.is_urgent() {
                    warn!(alert.id = id, alert.event = %event, campaign.id = campaign,
                        "alert (slack.webhook_url is not set): {text}");
                } else {
                    info!(alert.id = id, alert.event = %event, campaign.id = campaign,
                        "alert (slack.webhook_url is not set): {text}");
                }
                self.mark(alert.id, attempts, Mark::Logged).await?;
                handled += 1;
                continue;
            };
            match self.post(webhook, &text).await {
                Ok(()) => {
                    info!(
                        alert.id = alert.id,
                        alert.event = %alert.event,
                        campaign.id = alert.campaign_id,
                        attempts,
                        "alert delivered to Slack"
                    );
                    self.mark(alert.id, attempts, Mark::Sent).await?;
                    handled += 1;
                }
                Err(Failed { error, retry_after }) => {
                    let after = retry_delay(attempts).max(retry_after.unwrap_or_default());
                    warn!(
                        alert.id = alert.id,
                        alert.event = %alert.event,
                        campaign.id = alert.campaign_id,
                        attempts,
                        retry_in_s = after.as_secs(),
                        error = %error,
                        "cannot deliver the alert to Slack; it stays queued and is retried"
                    );
                    self.mark(alert.id, attempts, Mark::Retry { after, error }).await?;
                    break;
                }
            }
        }
        Ok(handled)
    }

    /// Posts `{"text": ...}`; the error never contains the URL.
    async fn post(&self, webhook: &SecretString, text: &str) -> Result<(), Failed> {
        let url = webhook.expose_secret();
        let body = serde_json::json!({ "text": text });
        let response = self
            .client
            .post(url)
            .json(&body)
            .send()
            .await
            .map_err(|e| Failed { error: scrub(&describe(e), url), retry_after: None })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        // Slack rate-limits webhooks with 429 and Retry-After (in seconds).
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_DELAY));
        let answer = response.text().await.unwrap_or_default();
        let answer = truncate(answer.trim(), 200);
        let error = if answer.is_empty() {
            format!("Slack answered HTTP {}", status.as_u16())
        } else {
            format!("Slack answered HTTP {}: {answer}", status.as_u16())
        };
        Err(Failed { error: scrub(&error, url), retry_after })
    }

    /// Records the attempt's result. A deadlock or lock wait is retried a few times; other
    /// errors are not (the job must stay short): an alert that Slack took but that is not marked
    /// is sent again after its lease.
    async fn mark(&self, id: i64, attempts: i32, mark: Mark) -> Result<(), DbError> {
        let mut tries = 0u64;
        loop {
            let result = async {
                let mut c = conn(&self.pool).await?;
                write_mark(&mut c, id, attempts, &mark).await.map_err(DbError::from)
            };
            match result.await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable_lock() && tries < 3 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A failed delivery attempt.
struct Failed {
    /// What went wrong, without the webhook URL.
    error: String,
    /// Slack's `Retry-After`, if it sent one.
    retry_after: Option<Duration>,
}

#[derive(QueryableByName)]
struct ClaimRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Integer)]
    alert_attempts: i32,
}

#[derive(QueryableByName)]
struct AlertRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    event: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    campaign_id: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    detail: Option<String>,
    #[diesel(sql_type = Datetime)]
    created_at: NaiveDateTime,
    #[diesel(sql_type = Nullable<Text>)]
    campaign_name: Option<String>,
    #[diesel(sql_type = Nullable<Datetime>)]
    started_at: Option<NaiveDateTime>,
    #[diesel(sql_type = Nullable<Datetime>)]
    completed_at: Option<NaiveDateTime>,
}

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Claims the alert due first: counts the attempt and leases it for [`LEASE_SECS`], in one short
/// transaction; then reads what its message needs.
async fn claim_next(c: &mut AsyncMysqlConnection) -> QResult<Option<Claimed>> {
    let claimed = c
        .transaction(async |c| {
            let mut rows: Vec<ClaimRow> = diesel::sql_query(
                "SELECT id, alert_attempts FROM campaign_events \
                 WHERE alert_state = 'PENDING' AND next_alert_at <= NOW(3) \
                 ORDER BY next_alert_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
            )
            .load(c)
            .await?;
            let Some(row) = rows.pop() else { return Ok(None) };
            diesel::sql_query(
                "UPDATE campaign_events SET alert_attempts = alert_attempts + 1, \
                 next_alert_at = NOW(3) + INTERVAL ? SECOND WHERE id = ?",
            )
            .bind::<BigInt, _>(LEASE_SECS)
            .bind::<BigInt, _>(row.id)
            .execute(c)
            .await?;
            QResult::Ok(Some((row.id, row.alert_attempts + 1)))
        })
        .await?;
    let Some((id, attempts)) = claimed else { return Ok(None) };
    let mut rows: Vec<AlertRow> = diesel::sql_query(
        "SELECT e.id, e.event, e.campaign_id, e.detail, e.created_at, c.name AS campaign_name, \
         c.started_at, c.completed_at \
         FROM campaign_events e LEFT JOIN campaigns c ON c.id = e.campaign_id WHERE e.id = ?",
    )
    .bind::<BigInt, _>(id)
    .load(c)
    .await?;
    let Some(row) = rows.pop() else { return Ok(None) };
    let dead_letters = match (AlertKind::parse(&row.event), row.campaign_id) {
        (Some(AlertKind::Completed), Some(campaign)) => {
            let mut n: Vec<CountRow> = diesel::sql_query(
                "SELECT COUNT(*) AS n FROM dead_letters \
                 WHERE campaign_id = ? AND resolved_at IS NULL",
            )
            .bind::<BigInt, _>(campaign)
            .load(c)
            .await?;
            n.pop().map(|r| r.n.max(0) as u64)
        }
        _ => None,
    };
    let detail = row
        .detail
        .as_deref()
        .and_then(|d| serde_json::from_str(d).ok())
        .unwrap_or(serde_json::Value::Null);
    let alert = Alert {
        id: row.id,
        event: row.event,
        campaign_id: row.campaign_id,
        campaign_name: row.campaign_name,
        detail,
        created_at: row.created_at,
        started_at: row.started_at,
        completed_at: row.completed_at,
        dead_letters,
    };
    Ok(Some(Claimed { alert, attempts }))
}

/// Writes an attempt's result, fenced by the attempt count of the claim (an instance that took
/// the alert over after the lease owns it now).
async fn write_mark(
    c: &mut AsyncMysqlConnection,
    id: i64,
    attempts: i32,
    mark: &Mark,
) -> QResult<()> {
    let state = match mark {
        Mark::Sent => "SENT",
        Mark::Logged => "LOGGED",
        Mark::Retry { after, error } => {
            diesel::sql_query(
                "UPDATE campaign_events SET next_alert_at = NOW(3) + INTERVAL ? MICROSECOND, \
                 last_alert_error = ? \
                 WHERE id = ? AND alert_state = 'PENDING' AND alert_attempts = ?",
            )
            .bind::<BigInt, _>(i64::try_from(after.as_micros()).unwrap_or(i64::MAX))
            .bind::<Text, _>(truncate(error, MAX_ERROR_CHARS))
            .bind::<BigInt, _>(id)
            .bind::<Integer, _>(attempts)
            .execute(c)
            .await?;
            return Ok(());
        }
    };
    diesel::sql_query(
        "UPDATE campaign_events SET alert_state = ?, alerted_at = NOW(3), next_alert_at = NULL, \
         last_alert_error = NULL WHERE id = ? AND alert_state = 'PENDING' AND alert_attempts = ?",
    )
    .bind::<Text, _>(state)
    .bind::<BigInt, _>(id)
    .bind::<Integer, _>(attempts)
    .execute(c)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Failure rate

/// The counts behind a campaign's failure rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailureCounts {
    pub failed: u64,
    pub dead: u64,
    pub total: u64,
}

impl FailureCounts {
    pub fn from_status_counts(counts: &BTreeMap<TargetStatus, u64>) -> FailureCounts {
        let mut out = FailureCounts::default();
        for (status, n) in counts {
            out.total += n;
            match status {
                TargetStatus::Failed => out.failed += n,
                TargetStatus::Dead => out.dead += n,
                TargetStatus::Pending | TargetStatus::InFlight | TargetStatus::Succeeded => {}
            }
        }
        out
    }

    /// (FAILED + DEAD) / all rows × 100; 0 for a campaign without rows.
    pub fn rate_pct(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            (self.failed + self.dead) as f64 * 100.0 / self.total as f64
        }
    }
}

/// Reads a campaign's failure counts: the one place to swap for cheaper counters.
pub async fn failure_counts(
    c: &mut AsyncMysqlConnection,
    _table: &str,
    id: CampaignId,
) -> QResult<FailureCounts> {
    // The engine's counters (`campaign_progress`): no scan of the campaign's rows.
    Ok(match repo::progress(c, id).await? {
        Some(p) => FailureCounts {
            failed: p.failed.max(0) as u64,
            dead: p.dead.max(0) as u64,
            total: p.total_rows.max(0) as u64,
        },
        None => FailureCounts::default(),
    })
}

/// What the watcher does about one campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crossing {
    /// Above the threshold and armed: record `FAILURE_RATE_HIGH` and disarm.
    Raise,
    /// Back at or below the threshold while disarmed: arm again.
    Rearm,
    /// Nothing changed.
    Keep,
}

pub fn crossing(armed: bool, rate_pct: f64, threshold_pct: f64) -> Crossing {
    match (armed, rate_pct > threshold_pct) {
        (true, true) => Crossing::Raise,
        (false, false) => Crossing::Rearm,
        (true, false) | (false, true) => Crossing::Keep,
    }
}

/// Watches the failure rate of RUNNING campaigns.
pub struct FailureRateWatcher {
    pool: DbPool,
    kinds: KindRegistry,
    threshold_pct: f64,
    actor: String,
}

#[derive(QueryableByName)]
struct ArmedRow {
    #[diesel(sql_type = BigInt)]
    armed: i64,
}

impl FailureRateWatcher {
    /// `actor` is recorded with the events (e.g. `daemon:<instance>`).
    pub fn new(
        pool: DbPool,
        kinds: KindRegistry,
        threshold_pct: f64,
        actor: String,
    ) -> FailureRateWatcher {
        FailureRateWatcher { pool, kinds, threshold_pct, actor }
    }

    /// One pass over the RUNNING campaigns; returns how many alerts it recorded.
    pub async fn tick(&self) -> Result<usize, DbError> {
        let mut c = conn(&self.pool).await?;
        let mut raised = 0;
        for campaign in repo::running_campaigns(&mut c).await? {
            let Some(kind) = self.kinds.get(&campaign.kind) else { continue };
            let id = campaign.id();
            let counts = failure_counts(&mut c, kind.table(), id).await?;
            let mut armed: Vec<ArmedRow> = diesel::sql_query(
                "SELECT CAST(failure_alert_armed AS SIGNED) AS armed FROM campaigns WHERE id = ?",
            )
            .bind::<BigInt, _>(id.0)
            .load(&mut c)
            .await?;
            let Some(armed) = armed.pop().map(|r| r.armed != 0) else { continue };
            let rate = counts.rate_pct();
            match crossing(armed, rate, self.threshold_pct) {
                Crossing::Raise => {
                    if raise(&mut c, id, counts, self.threshold_pct, &self.actor).await? {
                        warn!(
                            campaign.id = %id,
                            failure_rate_pct = format!("{rate:.2}"),
                            threshold_pct = self.threshold_pct,
                            failed = counts.failed,
                            dead = counts.dead,
                            rows = counts.total,
                            "failure rate above the threshold; alerting"
                        );
                        raised += 1;
                    }
                }
                Crossing::Rearm => {
                    diesel::sql_query(
                        "UPDATE campaigns SET failure_alert_armed = 1 \
                         WHERE id = ? AND failure_alert_armed = 0",
                    )
                    .bind::<BigInt, _>(id.0)
                    .execute(&mut c)
                    .await?;
                    info!(
                        campaign.id = %id,
                        failure_rate_pct = format!("{rate:.2}"),
                        threshold_pct = self.threshold_pct,
                        "failure rate back at or below the threshold; the alert is armed again"
                    );
                }
                Crossing::Keep => {}
            }
        }
        Ok(raised)
    }
}

/// Disarms the campaign and records the alert in one transaction; false if another instance
/// (or an earlier pass) got there first.
async fn raise(
    c: &mut AsyncMysqlConnection,
    id: CampaignId,
    counts: FailureCounts,
    threshold_pct: f64,
    actor: &str,
) -> QResult<bool> {
    c.transaction(async |c| {
        let n = diesel::sql_query(
            "UPDATE campaigns SET failure_alert_armed = 0 WHERE id = ? AND failure_alert_armed = 1",
        )
        .bind::<BigInt, _>(id.0)
        .execute(c)
        .await?;
        if n == 0 {
            return Ok(false);
        }
        let detail = serde_json::json!({
            "rate_pct": (counts.rate_pct() * 100.0).round() / 100.0,
            "threshold_pct": threshold_pct,
            "failed": counts.failed,
            "dead": counts.dead,
            "total": counts.total,
        })
        .to_string();
        repo::record_event(
            c,
            Some(id),
            AlertKind::FailureRateHigh.event(),
            None,
            actor,
            Some(&detail),
        )
        .await?;
        Ok(true)
    })
    .await
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;

    use super::*;

    fn at(h: u32, m: u32, s: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(2026, 11, 25)
            .and_then(|d| d.and_hms_opt(h, m, s))
            .unwrap_or_default()
    }

    fn alert(event: &str, detail: serde_json::Value) -> Alert {
        Alert {
            id: 7,
            event: event.to_owned(),
            campaign_id: Some(43),
            campaign_name: Some("winter points".to_owned()),
            detail,
            created_at: at(10, 0, 0),
            started_at: None,
            completed_at: None,
            dead_letters: None,
        }
    }

    #[test]
    fn the_alert_kinds_are_exactly_the_alert_events() {
        let kinds: Vec<&str> = AlertKind::ALL.iter().map(|k| k.event()).collect();
        assert_eq!(kinds, repo::ALERT_EVENTS.to_vec());
        for event in repo::ALERT_EVENTS {
            assert_eq!(AlertKind::parse(event).map(AlertKind::event), Some(event));
        }
        assert_eq!(AlertKind::parse("STATUS_CHANGED"), None);
    }

    #[test]
    fn breaker_opened_is_urgent_and_says_who_paused_the_campaign() {
        let a = alert(
            "BREAKER_OPENED",
            serde_json::json!({ "last_error": "server error 503", "urgent": true }),
        );
        assert!(a.is_urgent());
        assert_eq!(
            message(&a, at(10, 0, 1)),
            ":rotating_light: URGENT: campaign 43 \"winter points\" was paused by the circuit \
             breaker: Money failed repeatedly (last error: server error 503). payoutd probes \
             Money again and resumes the campaign by itself once Money answers; if it stays \
             paused, check Money."
        );
    }

    #[test]
    fn breaker_closed_says_campaigns_resume() {
        let a = alert("BREAKER_CLOSED", serde_json::json!({ "reason": "the probe succeeded" }));
        assert!(!a.is_urgent());
        assert_eq!(
            message(&a, at(10, 0, 1)),
            ":white_check_mark: Circuit breaker closed: Money answers again (the probe \
             succeeded). Campaigns the breaker paused resume. The probe request was sent for \
             campaign 43 \"winter points\"."
        );
        let without_campaign = Alert { campaign_id: None, campaign_name: None, ..a };
        assert!(message(&without_campaign, at(10, 0, 1)).ends_with("paused resume."));
    }

    #[test]
    fn completed_has_counts_duration_and_dead_letters() {
        let a = Alert {
            started_at: Some(at(9, 0, 0)),
            completed_at: Some(at(10, 2, 3)),
            created_at: at(10, 2, 3),
            dead_letters: Some(1_234),
            ..alert("COMPLETED", serde_json::json!({ "DEAD": 1_234, "SUCCEEDED": 1_998_766 }))
        };
        assert_eq!(
            message(&a, at(10, 2, 4)),
            ":checkered_flag: Campaign 43 \"winter points\" completed in 1 h 02 min 03 s: \
             1,998,766 succeeded, 1,234 dead of 2,000,000 rows. 1,234 dead letters to review \
             (payoutd dead-letters list)."
        );
        let clean = Alert {
            started_at: Some(at(10, 0, 0)),
            completed_at: Some(at(10, 0, 4)),
            dead_letters: Some(0),
            ..alert("COMPLETED", serde_json::json!({ "SUCCEEDED": 400 }))
        };
        assert_eq!(
            message(&clean, at(10, 0, 5)),
            ":checkered_flag: Campaign 43 \"winter points\" completed in 4.0 s: 400 succeeded \
             of 400 rows. No dead letters."
        );
    }

    #[test]
    fn config_fault_is_urgent_and_says_what_to_fix() {
        let a = alert("CONFIG_FAULT", serde_json::json!({ "reason": "401", "http_status": 401 }));
        assert!(a.is_urgent());
        assert_eq!(
            message(&a, at(10, 0, 1)),
            ":rotating_light: URGENT: campaign 43 \"winter points\" was paused: Money rejected \
             the API key (HTTP 401). Fix money.api_key, then resume the campaign (payoutd \
             campaign resume 43)."
        );
    }

    #[test]
    fn failure_rate_high_has_rate_threshold_and_counts() {
        let a = alert(
            "FAILURE_RATE_HIGH",
            serde_json::json!({
                "rate_pct": 5.0, "threshold_pct": 1.0, "failed": 3, "dead": 17, "total": 400
            }),
        );
        assert!(!a.is_urgent());
        assert_eq!(
            message(&a, at(10, 0, 1)),
            ":warning: Campaign 43 \"winter points\": failure rate 5.00 % is above the 1.00 % \
             threshold (3 failed, 17 dead of 400 rows). The campaign keeps running; this alert \
             repeats only after the rate falls back to 1.00 % or below."
        );
    }

    #[test]
    fn names_are_escaped_and_late_alerts_say_when_they_happened() {
        let a = Alert {
            campaign_name: Some("<!channel> & co".to_owned()),
            ..alert("BREAKER_CLOSED", serde_json::Value::Null)
        };
        let text = message(&a, at(10, 5, 0));
        assert!(text.contains("campaign 43 \"&lt;!channel&gt; &amp; co\""), "{text}");
        assert!(text.ends_with(" (recorded 2026-11-25 10:00:00 UTC)"), "{text}");
        assert!(!message(&a, at(10, 1, 0)).contains("recorded"));
    }

    #[test]
    fn unknown_events_still_make_a_message() {
        let a = alert("SOMETHING_NEW", serde_json::json!({ "x": 1 }));
        assert_eq!(
            message(&a, at(10, 0, 0)),
            ":information_source: payoutd event SOMETHING_NEW for campaign 43 \"winter points\": \
             {\"x\":1}"
        );
    }

    #[test]
    fn retries_back_off_exponentially_up_to_five_minutes() {
        let table = [(0, 1), (1, 1), (2, 2), (3, 4), (4, 8), (9, 256), (10, 300), (1000, 300)];
        for (attempts, secs) in table {
            assert_eq!(retry_delay(attempts), Duration::from_secs(secs), "{attempts}");
        }
    }

    #[test]
    fn the_webhook_url_is_scrubbed_from_errors() {
        let url = "https://hooks.slack.com/services/T0/B0/secret-token";
        assert_eq!(
            scrub(&format!("error sending request for url ({url}): timed out"), url),
            "error sending request for url (***): timed out"
        );
        assert_eq!(scrub("POST /services/T0/B0/secret-token failed", url), "POST /*** failed");
        assert_eq!(scrub("connection refused", url), "connection refused");
        assert_eq!(scrub("x", "http://host"), "x");
    }

    #[test]
    fn numbers_and_durations_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(human_duration(Duration::from_millis(4_250)), "4.2 s");
        assert_eq!(human_duration(Duration::from_secs(185)), "3 min 05 s");
        assert_eq!(human_duration(Duration::from_secs(7_385)), "2 h 03 min 05 s");
    }

    #[test]
    fn the_failure_rate_counts_failed_and_dead_rows_of_all_rows() {
        let counts: BTreeMap<TargetStatus, u64> = [
            (TargetStatus::Succeeded, 370),
            (TargetStatus::Dead, 17),
            (TargetStatus::Failed, 3),
            (TargetStatus::Pending, 6),
            (TargetStatus::InFlight, 4),
        ]
        .into_iter()
        .collect();
        let f = FailureCounts::from_status_counts(&counts);
        assert_eq!(f, FailureCounts { failed: 3, dead: 17, total: 400 });
        assert!((f.rate_pct() - 5.0).abs() < 1e-9);
        assert!(FailureCounts::default().rate_pct().abs() < f64::EPSILON);
    }

    #[test]
    fn the_alert_fires_once_per_crossing() {
        let table = [
            (true, 0.5, Crossing::Keep),
            (true, 1.0, Crossing::Keep),
            (true, 1.01, Crossing::Raise),
            (false, 5.0, Crossing::Keep),
            (false, 1.0, Crossing::Rearm),
            (false, 0.0, Crossing::Rearm),
        ];
        for (armed, rate, want) in table {
            assert_eq!(crossing(armed, rate, 1.0), want, "armed {armed}, rate {rate}");
        }
    }
}
