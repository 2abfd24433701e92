//! payoutd's configuration: every key, where it comes from, and the checks it must pass before
//! any command runs.
//!
//! Sources, each overriding the one before it:
//!
//! 1. the defaults below;
//! 2. a TOML file: `--config PATH` (must exist), else `/etc/payoutd/payoutd.toml` when present;
//! 3. environment variables `PAYOUTD_<SECTION>__<KEY>` (e.g. `PAYOUTD_MONEY__TIMEOUT=5s`). Only
//!    names containing `__` count, so `PAYOUTD_CONFIG` or `PAYOUTD_TEST_DATABASE_URL` are not
//!    configuration keys. Names are matched case-insensitively; values are taken verbatim.
//!
//! An unknown section or key, a value of the wrong shape and a value out of range are errors that
//! name the key and where its value came from. An empty string counts as "not set", so an
//! environment variable can clear a value the file sets (`PAYOUTD_DATABASE__URL_FILE=`).
//! Durations are written like `3s`, `250ms`, `5m`, `1h 30m`.
//!
//! Keys with a secret (`database.url`, `money.api_key`, `slack.webhook_url`) may instead name a
//! file holding it (`…_file`; one trailing newline is dropped); setting both is an error. A
//! secret is read only when a command asks for it, so commands that do not need the Money API key
//! run without one, and an unreadable key file only stops the commands that need it. Secrets
//! print as `***`; a database URL prints as `mysql://user:***@host:port/db`.
//!
//! | key | environment variable | default |
//! |---|---|---|
//! | `database.url` | `PAYOUTD_DATABASE__URL` | required by every command that uses the database, e.g. `mysql://payout:secret@127.0.0.1:3306/payout` |
//! | `database.url_file` | `PAYOUTD_DATABASE__URL_FILE` | none; a file holding `database.url` |
//! | `database.pool_size` | `PAYOUTD_DATABASE__POOL_SIZE` | `16` (at least 1) |
//! | `database.migrate_on_start` | `PAYOUTD_DATABASE__MIGRATE_ON_START` | `true`: `payoutd run` applies pending migrations first |
//! | `database.connect_timeout` | `PAYOUTD_DATABASE__CONNECT_TIMEOUT` | `5s` (above 0) |
//! | `money.base_url` | `PAYOUTD_MONEY__BASE_URL` | required by `payoutd run`; `http://` or `https://`, trailing `/` dropped |
//! | `money.api_key` | `PAYOUTD_MONEY__API_KEY` | required by `payoutd run` unless `money.api_key_file` is set or the systemd credential `money-api-key` (`$CREDENTIALS_DIRECTORY/money-api-key`) exists |
//! | `money.api_key_file` | `PAYOUTD_MONEY__API_KEY_FILE` | none; a file holding `money.api_key` |
//! | `money.rate_limit_per_sec` | `PAYOUTD_MONEY__RATE_LIMIT_PER_SEC` | `1000` (at least 1): requests per second, across all campaigns |
//! | `money.rate_slack` | `PAYOUTD_MONEY__RATE_SLACK` | `4ms` (0 to 200ms): time kept free in every one-second window for uneven delay on the way to Money; each ms costs 0.1 % of throughput |
//! | `money.rate_reserve` | `PAYOUTD_MONEY__RATE_RESERVE` | `2` (0 to 100): places per 1,000 of the limit kept free in every window for single requests held up longer than the slack after they left (a stalled thread); each costs 0.1 % of throughput |
//! | `money.timeout` | `PAYOUTD_MONEY__TIMEOUT` | `3s` (above 0): one request, connect to last byte |
//! | `money.max_in_flight` | `PAYOUTD_MONEY__MAX_IN_FLIGHT` | `512` (at least 1): requests awaiting an answer at once; it must cover the limit × Money's slowest usual latency (1,000/s × 0.3 s = 300) |
//! | `slack.webhook_url` | `PAYOUTD_SLACK__WEBHOOK_URL` | none: alerts are logged only |
//! | `slack.webhook_url_file` | `PAYOUTD_SLACK__WEBHOOK_URL_FILE` | none; a file holding `slack.webhook_url` |
//! | `executor.batch_size` | `PAYOUTD_EXECUTOR__BATCH_SIZE` | `250` (1 to 5000): rows claimed per partition step |
//! | `executor.partitions_medium_from` | `PAYOUTD_EXECUTOR__PARTITIONS_MEDIUM_FROM` | `1000001`: campaigns with at least this many rows get 6 partitions (fewer rows: 4) |
//! | `executor.partitions_large_from` | `PAYOUTD_EXECUTOR__PARTITIONS_LARGE_FROM` | `2000000`: campaigns with at least this many rows get 8 partitions; above `partitions_medium_from` |
//! | `executor.partitions` | `PAYOUTD_EXECUTOR__PARTITIONS` | `0` (0 to 8): 0 follows the 4/6/8 rule; 1 to 8 gives every newly planned campaign that many partitions (benchmarks) |
//! | `executor.idle_poll` | `PAYOUTD_EXECUTOR__IDLE_POLL` | `200ms` (above 0): wait between polls when there is no work |
//! | `executor.gate_poll` | `PAYOUTD_EXECUTOR__GATE_POLL` | `200ms` (above 0, at most 1s): how often campaign status is re-read |
//! | `executor.flush_interval` | `PAYOUTD_EXECUTOR__FLUSH_INTERVAL` | `50ms` (above 0): how often results are written back |
//! | `executor.drain_timeout` | `PAYOUTD_EXECUTOR__DRAIN_TIMEOUT` | `10s`: how long shutdown waits for requests in flight |
//! | `executor.lease_time` | `PAYOUTD_EXECUTOR__LEASE_TIME` | `15s` (above `lease_check`): a partition lease not renewed this long is taken over by another instance |
//! | `executor.lease_check` | `PAYOUTD_EXECUTOR__LEASE_CHECK` | `1s` (above 0): how often leases are renewed and partitions rebalanced between instances |
//! | `executor.local_takeover` | `PAYOUTD_EXECUTOR__LOCAL_TAKEOVER` | `true`: take the leases of a daemon process of this host that is gone (checked in `/proc`) at once instead of after `lease_time`; turn off where daemons on one hostname do not share a pid namespace |
//! | `executor.replan_check` | `PAYOUTD_EXECUTOR__REPLAN_CHECK` | `30s`: how often the remaining row count is checked against the 4/6/8 rule; `0s` turns re-planning off |
//! | `payout.max_point_amount` | `PAYOUTD_PAYOUT__MAX_POINT_AMOUNT` | `1000000` (at least 1): largest `amount` of one point row |
//! | `payout.expiry_utc_offset` | `PAYOUTD_PAYOUT__EXPIRY_UTC_OFFSET` | `"+09:00"` (`±HH:MM`): the offset `expiry_at` is written in |
//! | `retry.base_delay` | `PAYOUTD_RETRY__BASE_DELAY` | `3s` (above 0): delay before the first retry |
//! | `retry.multiplier` | `PAYOUTD_RETRY__MULTIPLIER` | `2.0` (at least 1.0): growth of the delay per retry |
//! | `retry.max_delay` | `PAYOUTD_RETRY__MAX_DELAY` | `5m` (at least `base_delay`): cap on one delay |
//! | `retry.max_retries` | `PAYOUTD_RETRY__MAX_RETRIES` | `5`: retries after the first attempt before a row is DEAD |
//! | `retry.jitter` | `PAYOUTD_RETRY__JITTER` | `0.2` (0 to 1): share by which a delay randomly varies either way |
//! | `breaker.failure_threshold` | `PAYOUTD_BREAKER__FAILURE_THRESHOLD` | `10` (at least 1): consecutive transient Money failures that open the circuit breaker |
//! | `breaker.open_for` | `PAYOUTD_BREAKER__OPEN_FOR` | `30s` (above 0): how long the breaker stays open before one probe |
//! | `alerts.failure_rate_threshold_pct` | `PAYOUTD_ALERTS__FAILURE_RATE_THRESHOLD_PCT` | `1.0` (0 to 100): a campaign's failure rate ((FAILED + DEAD) / all rows × 100) above this raises one Slack alert per crossing |
//! | `alerts.failure_rate_check_interval` | `PAYOUTD_ALERTS__FAILURE_RATE_CHECK_INTERVAL` | `5s` (1s to 59s, whole seconds): how often the failure rate of running campaigns is checked |
//! | `log.format` | `PAYOUTD_LOG__FORMAT` | `"auto"`: `"json"`, `"text"`, or `"auto"` (text on a terminal, else JSON) |
//! | `log.filter` | `PAYOUTD_LOG__FILTER` | `"info"`, in `tracing` `EnvFilter` syntax (e.g. `info,payout_core=debug`) |
//! | `log.throughput_interval` | `PAYOUTD_LOG__THROUGHPUT_INTERVAL` | `10s` (above 0): period of the throughput line per running campaign |
//!
//! `payoutd.example.toml` beside `Cargo.toml` lists every key with its default.

use std::fmt;
use std::fs;
use std::io;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// Read when `--config` is not given, if it exists.
pub(crate) const DEFAULT_CONFIG_FILE: &str = "/etc/payoutd/payoutd.toml";
const ENV_PREFIX: &str = "PAYOUTD_";
const ENV_SEPARATOR: &str = "__";
/// systemd's `LoadCredential=` directory for the running unit.
const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";
const API_KEY_CREDENTIAL: &str = "money-api-key";
/// Figment metadata name of the environment layer; how an error learns a value came from there.
const ENV_LAYER: &str = "environment";

/// Keys whose values must not appear in error messages.
const SECRET_KEYS: &[&str] = &["database.url", "money.api_key", "slack.webhook_url"];

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

/// The validated configuration. Secrets and the keys only some commands need are behind
/// accessors ([`Settings::database_url`], [`Settings::require_run`], ...) that fail with an error
/// naming the key when it is missing.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) database: DatabaseSettings,
    pub(crate) money: MoneySettings,
    pub(crate) slack: SlackSettings,
    pub(crate) executor: ExecutorSettings,
    pub(crate) payout: PayoutSettings,
    pub(crate) retry: RetrySettings,
    pub(crate) breaker: BreakerSettings,
    pub(crate) alerts: AlertSettings,
    pub(crate) log: LogSettings,
    /// The TOML file that was read, if any.
    pub(crate) file: Option<PathBuf>,
}

/// `[database]`. The URL is read through [`Settings::database_url`].
#[derive(Debug, Clone)]
pub(crate) struct DatabaseSettings {
    url: SecretSource<DatabaseUrl>,
    pub(crate) pool_size: usize,
    pub(crate) migrate_on_start: bool,
    pub(crate) connect_timeout: Duration,
}

/// `[money]`. URL and key are read through [`Settings::money_base_url`] and
/// [`Settings::money_api_key`].
#[derive(Debug, Clone)]
pub(crate) struct MoneySettings {
    base_url: Option<String>,
    api_key: SecretSource<Secret>,
    pub(crate) rate_limit_per_sec: NonZeroU32,
    pub(crate) rate_slack: Duration,
    pub(crate) rate_reserve: u32,
    pub(crate) timeout: Duration,
    pub(crate) max_in_flight: usize,
}

/// `[slack]`. The webhook is read through [`Settings::slack_webhook_url`].
#[derive(Debug, Clone, Default)]
pub(crate) struct SlackSettings {
    webhook_url: SecretSource<Secret>,
}

/// `[executor]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExecutorSettings {
    pub(crate) batch_size: u32,
    pub(crate) partitions_medium_from: u64,
    pub(crate) partitions_large_from: u64,
    pub(crate) partitions: u16,
    pub(crate) idle_poll: Duration,
    pub(crate) gate_poll: Duration,
    pub(crate) flush_interval: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) lease_time: Duration,
    pub(crate) lease_check: Duration,
    pub(crate) replan_check: Duration,
    pub(crate) local_takeover: bool,
}

/// `[payout]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PayoutSettings {
    pub(crate) max_point_amount: i64,
    /// `payout.expiry_utc_offset` as seconds east of UTC (`+09:00` is 32400).
    pub(crate) expiry_utc_offset_secs: i32,
}

/// `[retry]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RetrySettings {
    pub(crate) base_delay: Duration,
    pub(crate) multiplier: f64,
    pub(crate) max_delay: Duration,
    pub(crate) max_retries: u32,
    pub(crate) jitter: f64,
}

/// `[breaker]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BreakerSettings {
    pub(crate) failure_threshold: u32,
    pub(crate) open_for: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings { failure_threshold: 10, open_for: Duration::from_secs(30) }
    }
}

/// `[alerts]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AlertSettings {
    pub(crate) failure_rate_threshold_pct: f64,
    pub(crate) failure_rate_check_interval: Duration,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            failure_rate_threshold_pct: 1.0,
            failure_rate_check_interval: Duration::from_secs(5),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogSettings {
    pub(crate) format: LogFormat,
    /// Validated `EnvFilter` directives.
    pub(crate) filter: String,
    pub(crate) throughput_interval: Duration,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    /// Text when stderr is a terminal, JSON otherwise.
    Auto,
    Json,
    Text,
}

/// What `payoutd run` needs beyond the always-present settings and the database URL, resolved.
/// (The database URL is checked by [`Settings::require_run`] too, but read through
/// [`Settings::database_url`], which every database command shares.)
#[derive(Debug, Clone)]
pub(crate) struct RunSettings {
    pub(crate) money_base_url: String,
    pub(crate) money_api_key: Secret,
    pub(crate) slack_webhook_url: Option<Secret>,
}

impl Default for MoneySettings {
    fn default() -> Self {
        MoneySettings {
            base_url: None,
            api_key: SecretSource::Unset,
            rate_limit_per_sec: NonZeroU32::new(1000).unwrap_or(NonZeroU32::MIN),
            rate_slack: payout_core::rate::DEFAULT_SLACK,
            rate_reserve: payout_core::rate::DEFAULT_RESERVE,
            timeout: Duration::from_secs(3),
            max_in_flight: 512,
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: SecretSource::Unset,
            pool_size: 16,
            migrate_on_start: true,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for ExecutorSettings {
    fn default() -> Self {
        ExecutorSettings {
            batch_size: 250,
            partitions_medium_from: 1_000_001,
            partitions_large_from: 2_000_000,
            partitions: 0,
            idle_poll: Duration::from_millis(200),
            gate_poll: Duration::from_millis(200),
            flush_interval: Duration::from_millis(50),
            drain_timeout: Duration::from_secs(10),
            lease_time: Duration::from_secs(15),
            lease_check: Duration::from_secs(1),
            replan_check: Duration::from_secs(30),
            local_takeover: true,
        }
    }
}

impl Default for PayoutSettings {
    fn default() -> Self {
        PayoutSettings { max_point_amount: 1_000_000, expiry_utc_offset_secs: 9 * 3600 }
    }
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            base_delay: Duration::from_secs(3),
            multiplier: 2.0,
            max_delay: Duration::from_secs(5 * 60),
            max_retries: 5,
            jitter: 0.2,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Auto,
            filter: "info".to_owned(),
            throughput_interval: Duration::from_secs(10),
        }
    }
}

impl LogFormat {
    fn as_str(self) -> &'static str {
        match self {
            LogFormat::Auto => "auto",
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        }
    }
}

impl Settings {
    /// Loads from the TOML file and the process environment.
    ///
    /// `explicit_file` says the user named `file` (`--config`): then it must exist. Otherwise
    /// `file` (or, when `None`, [`DEFAULT_CONFIG_FILE`]) is read only if it exists, and the
    /// daemon runs on defaults and environment alone.
    pub(crate) fn load(file: Option<&Path>, explicit_file: bool) -> Result<Settings, ConfigError> {
        let file = config_file_to_read(file, explicit_file)?;
        let env = std::env::vars_os().map(|(name, value)| {
            (name.to_string_lossy().into_owned(), value.to_string_lossy().into_owned())
        });
        Settings::load_from(file.as_deref(), env)
    }

    /// Loads from exactly this file (`None`: no file) and these environment variables; the
    /// process environment is not consulted. `CREDENTIALS_DIRECTORY` is looked up in `env` too.
    pub(crate) fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut figment = Figment::new();
        if let Some(path) = file {
            figment = figment.merge(Layer {
                metadata: Metadata::from("TOML file", path),
                dict: read_toml(path)?,
            });
        }
        figment = figment.merge(Layer {
            metadata: Metadata::named(ENV_LAYER)
                .interpolater(|_: &Profile, keys: &[&str]| env_var_name(&keys.join("."))),
            dict: env_dict(&env)?,
        });
        let raw: Raw =
            figment.extract_lossy().map_err(|e| ConfigError::from_figment(e, &figment))?;
        let credentials_dir = env
            .iter()
            .find(|(name, value)| name == CREDENTIALS_DIRECTORY && !value.is_empty())
            .map(|(_, value)| PathBuf::from(value));
        let mut settings = Check { figment: &figment }.settings(raw, credentials_dir.as_deref())?;
        settings.file = file.map(Path::to_path_buf);
        Ok(settings)
    }

    /// `database.url`, read from `database.url_file` if that is how it was given.
    pub(crate) fn database_url(&self) -> Result<DatabaseUrl, ConfigError> {
        let url = self
            .database
            .url
            .resolve("database.url_file", |text| DatabaseUrl::parse(text).map_err(str::to_owned))?;
        url.ok_or(ConfigError::Missing {
            key: "database.url",
            alternatives: ", or database.url_file",
        })
    }

    /// `money.base_url`, without a trailing `/`.
    pub(crate) fn money_base_url(&self) -> Result<&str, ConfigError> {
        self.money
            .base_url
            .as_deref()
            .ok_or(ConfigError::Missing { key: "money.base_url", alternatives: "" })
    }

    /// `money.api_key`, read from `money.api_key_file` or the systemd credential if that is how
    /// it was given.
    pub(crate) fn money_api_key(&self) -> Result<Secret, ConfigError> {
        let key = self.money.api_key.resolve("money.api_key_file", |text| Ok(Secret::new(text)))?;
        key.ok_or(ConfigError::Missing {
            key: "money.api_key",
            alternatives: ", money.api_key_file, or a systemd credential named money-api-key",
        })
    }

    /// `slack.webhook_url`, if configured (read from `slack.webhook_url_file` if given so).
    pub(crate) fn slack_webhook_url(&self) -> Result<Option<Secret>, ConfigError> {
        self.slack.webhook_url.resolve("slack.webhook_url_file", |text| {
            check_http_url(&text, false).map(|()| Secret::new(text))
        })
    }

    /// Checks everything `payoutd run` needs that other commands may lack (the database URL
    /// included, so that a missing one is reported first) and returns what is not read elsewhere.
    pub(crate) fn require_run(&self) -> Result<RunSettings, ConfigError> {
        self.database_url()?;
        Ok(RunSettings {
            money_base_url: self.money_base_url()?.to_owned(),
            money_api_key: self.money_api_key()?,
            slack_webhook_url: self.slack_webhook_url()?,
        })
    }

    /// The effective configuration as TOML, secrets shown as `"***"` (the database URL keeps all
    /// but its password). Secret files are named, not read. Loading the output gives the same
    /// settings apart from the secrets.
    pub(crate) fn masked_toml(&self) -> String {
        let mut out = TomlWriter::default();
        out.comment("Effective payoutd configuration; secrets are shown as \"***\".");
        match &self.file {
            Some(path) => out.comment(&format!(
                "Sources: defaults, {}, PAYOUTD_* environment variables.",
                path.display()
            )),
            None => out.comment("Sources: defaults, PAYOUTD_* environment variables (no file)."),
        }

        let d = &self.database;
        out.section("database");
        match &d.url {
            SecretSource::Inline(url) => out.string("url", &url.to_string()),
            SecretSource::File(path) => out.path("url_file", path),
            SecretSource::Credential(path) => out.comment(&format!("url: from {}", path.display())),
            SecretSource::Unset => {
                out.comment("url: not set (required by commands that use the database)")
            }
        }
        out.plain("pool_size", d.pool_size);
        out.plain("migrate_on_start", d.migrate_on_start);
        out.duration("connect_timeout", d.connect_timeout);

        let m = &self.money;
        out.section("money");
        match &m.base_url {
            Some(url) => out.string("base_url", url),
            None => out.comment("base_url: not set (required by payoutd run)"),
        }
        match &m.api_key {
            SecretSource::Inline(_) => out.string("api_key", "***"),
            SecretSource::File(path) => out.path("api_key_file", path),
            SecretSource::Credential(path) => {
                out.comment(&format!("api_key: from systemd credential {}", path.display()));
            }
            SecretSource::Unset => out.comment("api_key: not set (required by payoutd run)"),
        }
        out.plain("rate_limit_per_sec", m.rate_limit_per_sec);
        out.duration("rate_slack", m.rate_slack);
        out.plain("rate_reserve", m.rate_reserve);
        out.duration("timeout", m.timeout);
        out.plain("max_in_flight", m.max_in_flight);

        out.section("slack");
        match &self.slack.webhook_url {
            SecretSource::Inline(_) => out.string("webhook_url", "***"),
            SecretSource::File(path) => out.path("webhook_url_file", path),
            SecretSource::Credential(path) => {
                out.comment(&format!("webhook_url: from {}", path.display()));
            }
            SecretSource::Unset => out.comment("webhook_url: not set (alerts are logged only)"),
        }

        let e = &self.executor;
        out.section("executor");
        out.plain("batch_size", e.batch_size);
        out.plain("partitions_medium_from", e.partitions_medium_from);
        out.plain("partitions_large_from", e.partitions_large_from);
        out.plain("partitions", e.partitions);
        out.duration("idle_poll", e.idle_poll);
        out.duration("gate_poll", e.gate_poll);
        out.duration("flush_interval", e.flush_interval);
        out.duration("drain_timeout", e.drain_timeout);
        out.duration("lease_time", e.lease_time);
        out.duration("lease_check", e.lease_check);
        out.duration("replan_check", e.replan_check);
        out.plain("local_takeover", e.local_takeover);

        let p = &self.payout;
        out.section("payout");
        out.plain("max_point_amount", p.max_point_amount);
        out.string("expiry_utc_offset", &format_utc_offset(p.expiry_utc_offset_secs));

        let r = &self.retry;
        out.section("retry");
        out.duration("base_delay", r.base_delay);
        out.float("multiplier", r.multiplier);
        out.duration("max_delay", r.max_delay);
        out.plain("max_retries", r.max_retries);
        out.float("jitter", r.jitter);

        let b = &self.breaker;
        out.section("breaker");
        out.plain("failure_threshold", b.failure_threshold);
        out.duration("open_for", b.open_for);

        let a = &self.alerts;
        out.section("alerts");
        out.float("failure_rate_threshold_pct", a.failure_rate_threshold_pct);
        out.duration("failure_rate_check_interval", a.failure_rate_check_interval);

        let l = &self.log;
        out.section("log");
        out.string("format", l.format.as_str());
        out.string("filter", &l.filter);
        out.duration("throughput_interval", l.throughput_interval);
        out.0
    }
}

/// Decides which file [`Settings::load`] reads.
fn config_file_to_read(
    file: Option<&Path>,
    explicit: bool,
) -> Result<Option<PathBuf>, ConfigError> {
    let (path, explicit) = match file {
        Some(path) => (path, explicit),
        None => (Path::new(DEFAULT_CONFIG_FILE), false),
    };
    match fs::metadata(path) {
        Ok(_) => Ok(Some(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if explicit {
                Err(ConfigError::FileNotFound { path: path.to_path_buf() })
            } else {
                Ok(None)
            }
        }
        // Present but not inspectable (e.g. a directory we may not enter): reading it will
        // report the real problem instead of silently running without the file.
        Err(_) => Ok(Some(path.to_path_buf())),
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A configuration problem; its `Display` is one line naming the key (or file) at fault.
///
/// Underlying I/O errors are part of the message rather than a `source()`, so that printing the
/// error chain does not repeat them.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("configuration file {} does not exist", .path.display())]
    FileNotFound { path: PathBuf },
    #[error("cannot read configuration file {}: {error}", .path.display())]
    FileUnreadable { path: PathBuf, error: io::Error },
    #[error("configuration file {} is not valid TOML: {message}", .path.display())]
    FileSyntax { path: PathBuf, message: String },
    #[error("unknown configuration key {key}{origin}{did_you_mean}")]
    UnknownKey { key: String, origin: Origin, did_you_mean: DidYouMean },
    #[error("{key}: {problem}{origin}")]
    Invalid { key: String, problem: String, origin: Origin },
    #[error("{first}{first_origin} and {second}{second_origin} are both set; set only one")]
    Conflict {
        first: &'static str,
        first_origin: Origin,
        second: &'static str,
        second_origin: Origin,
    },
    #[error("missing required configuration key {key} (or set {env}{alternatives})", env = env_var_name(.key))]
    Missing { key: &'static str, alternatives: &'static str },
    #[error("{key}: cannot read {}: {error}", .path.display())]
    SecretFileUnreadable { key: &'static str, path: PathBuf, error: io::Error },
    #[error("{key}: {}: {problem}", .path.display())]
    SecretFileInvalid { key: &'static str, path: PathBuf, problem: String },
}

/// Where a value came from, for error messages; displays with a leading space, or as nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Origin {
    #[default]
    Unknown,
    File(PathBuf),
    Env(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Unknown => Ok(()),
            Origin::File(path) => write!(f, " (in {})", path.display()),
            Origin::Env(name) => write!(f, " (from environment variable {name})"),
        }
    }
}

/// The known key nearest to a misspelt one; displays as `; did you mean …?`, or as nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DidYouMean(Option<String>);

impl fmt::Display for DidYouMean {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(key) => write!(f, "; did you mean {key}?"),
            None => Ok(()),
        }
    }
}

impl Origin {
    fn of(metadata: Option<&Metadata>, key: &str) -> Origin {
        let Some(metadata) = metadata else {
            return Origin::Unknown;
        };
        if let Some(path) = metadata.source.as_ref().and_then(|s| s.file_path()) {
            Origin::File(path.to_path_buf())
        } else if metadata.name == ENV_LAYER {
            let keys: Vec<&str> = key.split('.').collect();
            Origin::Env(metadata.interpolate(&Profile::Default, &keys))
        } else {
            Origin::Unknown
        }
    }
}

impl ConfigError {
    fn from_figment(error: figment::Error, figment: &Figment) -> ConfigError {
        use figment::error::Kind;

        let key = error.path.join(".");
        let origin = Origin::of(error.metadata.as_ref(), &key);
        // Never echo a secret's value, even a mistyped one.
        let secret = SECRET_KEYS.contains(&key.as_str());
        let problem = match &error.kind {
            Kind::UnknownField(name, known) => {
                let did_you_mean = closest(name, known).map(|k| match key.rsplit_once('.') {
                    Some((parent, _)) => format!("{parent}.{k}"),
                    None => k.to_owned(),
                });
                // An unknown section is reported by one of its keys, which names the whole key
                // and the environment variable that set it.
                let key = first_leaf(figment, key);
                let origin = Origin::of(figment.find_metadata(&key), &key);
                return ConfigError::UnknownKey {
                    key,
                    origin,
                    did_you_mean: DidYouMean(did_you_mean),
                };
            }
            Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) if secret => {
                format!("expected {}", plain_expected(expected))
            }
            Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
                format!("expected {}, found {actual}", plain_expected(expected))
            }
            Kind::Message(message) => one_line(message),
            other if secret => format!("invalid value ({})", kind_name(other)),
            other => one_line(&other.to_string()),
        };
        ConfigError::Invalid { key, problem, origin }
    }
}

/// `key`, extended through nested tables to the first plain value under it.
fn first_leaf(figment: &Figment, mut key: String) -> String {
    while let Ok(Value::Dict(_, dict)) = figment.find_value(&key) {
        let Some(first) = dict.keys().next() else {
            break;
        };
        key = format!("{key}.{first}");
    }
    key
}

/// The known name nearest to a misspelt one, if it is near enough to be a typo.
fn closest(name: &str, known: &[&'static str]) -> Option<&'static str> {
    let (distance, best) = known.iter().map(|k| (edit_distance(name, k), *k)).min()?;
    (distance <= (name.chars().count() / 3).max(1)).then_some(best)
}

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = Vec::with_capacity(b.len() + 1);
        current.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// serde names primitive types the way Rust does; say it the way an operator would.
fn plain_expected(expected: &str) -> String {
    match expected {
        "u8" => format!("a whole number from 0 to {}", u8::MAX),
        "u16" => format!("a whole number from 0 to {}", u16::MAX),
        "u32" => format!("a whole number from 0 to {}", u32::MAX),
        "u64" | "usize" => format!("a whole number from 0 to {}", u64::MAX),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".to_owned(),
        "a boolean" => "true or false".to_owned(),
        // Our own `Raw…` section structs.
        other if other.starts_with("struct Raw") => "a table of keys".to_owned(),
        other => other.to_owned(),
    }
}

fn kind_name(kind: &figment::error::Kind) -> &'static str {
    use figment::error::Kind;
    match kind {
        Kind::Message(_) => "message",
        Kind::InvalidType(..) => "wrong type",
        Kind::InvalidValue(..) => "wrong value",
        Kind::InvalidLength(..) => "wrong length",
        Kind::UnknownVariant(..) => "unknown variant",
        Kind::UnknownField(..) => "unknown field",
        Kind::MissingField(_) => "missing field",
        Kind::DuplicateField(_) => "duplicate field",
        Kind::ISizeOutOfRange(_) | Kind::USizeOutOfRange(_) => "number out of range",
        Kind::Unsupported(_) | Kind::UnsupportedKey(..) => "unsupported type",
    }
}

fn one_line(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

/// `money.rate_limit_per_sec` -> `PAYOUTD_MONEY__RATE_LIMIT_PER_SEC`.
fn env_var_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase().replace('.', ENV_SEPARATOR))
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// A secret string; `Debug` shows `***`. Hand it on with `SecretString::from`.
#[derive(Clone)]
pub(crate) struct Secret(SecretString);

impl Secret {
    pub(crate) fn new(value: String) -> Secret {
        Secret(SecretString::from(value))
    }

    pub(crate) fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<Secret> for SecretString {
    fn from(secret: Secret) -> SecretString {
        secret.0
    }
}

/// A `mysql://` URL whose password is a secret: `Display` and `Debug` show
/// `mysql://user:***@host:port/db`.
#[derive(Clone)]
pub(crate) struct DatabaseUrl(Secret);

impl DatabaseUrl {
    /// Checks the shape; the message never contains the URL (it may hold a password).
    fn parse(url: String) -> Result<DatabaseUrl, &'static str> {
        let host_and_path = url
            .strip_prefix("mysql://")
            .ok_or("expected a URL like mysql://user:password@host:3306/db")?;
        let host = host_and_path.rsplit_once('@').map_or(host_and_path, |(_, host)| host);
        if host.split(['/', '?', '#']).next().is_none_or(str::is_empty) {
            return Err("expected a URL like mysql://user:password@host:3306/db (no host given)");
        }
        Ok(DatabaseUrl(Secret::new(url)))
    }

    pub(crate) fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_url_password(self.expose()))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

impl From<DatabaseUrl> for SecretString {
    fn from(url: DatabaseUrl) -> SecretString {
        url.0.into()
    }
}

/// Replaces the password of `scheme://user:password@host...` with `***`.
///
/// The user part ends at the *last* `@`, so an unescaped `@` or `/` inside the password is
/// still masked; if that over-reaches into the path, more is hidden, never less.
fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// How a secret was given. Files are read when the secret is asked for, not at load.
#[derive(Debug, Clone, Default)]
enum SecretSource<T> {
    #[default]
    Unset,
    Inline(T),
    /// Named by the key's `…_file` companion.
    File(PathBuf),
    /// A systemd credential file.
    Credential(PathBuf),
}

impl<T: Clone> SecretSource<T> {
    /// `file_key` names the `…_file` key for messages; `parse` checks a file's content.
    fn resolve(
        &self,
        file_key: &'static str,
        parse: impl FnOnce(String) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        let (key, path) = match self {
            SecretSource::Unset => return Ok(None),
            SecretSource::Inline(value) => return Ok(Some(value.clone())),
            SecretSource::File(path) => (file_key, path),
            SecretSource::Credential(path) => ("systemd credential", path),
        };
        let text = fs::read_to_string(path).map_err(|error| ConfigError::SecretFileUnreadable {
            key,
            path: path.clone(),
            error,
        })?;
        let invalid =
            |problem: String| ConfigError::SecretFileInvalid { key, path: path.clone(), problem };
        // Editors and systemd credentials end files with a newline; it is not part of the secret.
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        if text.trim().is_empty() {
            return Err(invalid("the file is empty".to_owned()));
        }
        parse(text.to_owned()).map(Some).map_err(invalid)
    }
}

// ---------------------------------------------------------------------------------------------
// Sources
// ---------------------------------------------------------------------------------------------

/// One already-parsed source. figment merges the layers and remembers which one each value came
/// from, which the error messages use.
struct Layer {
    metadata: Metadata,
    dict: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// Read and parsed here rather than by `Toml::file`, which silently skips a missing file and
/// searches parent directories for relative paths, and whose errors span several lines.
fn read_toml(path: &Path) -> Result<Dict, ConfigError> {
    let text = fs::read_to_string(path)
        .map_err(|error| ConfigError::FileUnreadable { path: path.to_path_buf(), error })?;
    Toml::from_str::<Dict>(&text).map_err(|e| {
        let place = match e.span() {
            Some(span) => {
                let before = text.get(..span.start).unwrap_or(&text);
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!("line {line}, column {column}: ")
            }
            None => String::new(),
        };
        ConfigError::FileSyntax {
            path: path.to_path_buf(),
            message: format!("{place}{}", one_line(e.message())),
        }
    })
}

/// The `PAYOUTD_<SECTION>__<KEY>` variables as nested dictionaries, values as strings.
///
/// Same naming rules as `figment::providers::Env::prefixed("PAYOUTD_").split("__")`, except
/// that names without `__` are skipped (they belong to the command line or to tests) and values
/// are kept verbatim: `Env` would parse them, turning an API key `0123` into the number 123 and
/// stripping quotes. Numbers and booleans are converted from strings at extraction instead.
fn env_dict(env: &[(String, String)]) -> Result<Dict, ConfigError> {
    let mut dict = Dict::new();
    for (name, value) in env {
        let Some(rest) = strip_prefix_ignore_case(name, ENV_PREFIX) else {
            continue;
        };
        if !rest.contains(ENV_SEPARATOR) {
            continue;
        }
        let path: Vec<String> = rest.split(ENV_SEPARATOR).map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::UnknownKey {
                key: path.join("."),
                origin: Origin::Env(name.clone()),
                did_you_mean: DidYouMean::default(),
            });
        }
        if !insert_nested(&mut dict, &path, Value::from(value.clone())) {
            // Two names for one key (`PAYOUTD_A__B` and `payoutd_a__b`), or a key and a key
            // under it: whichever came last in the environment would win, silently.
            return Err(ConfigError::Invalid {
                key: path.join("."),
                problem: "set by more than one environment variable".to_owned(),
                origin: Origin::Env(name.clone()),
            });
        }
    }
    Ok(dict)
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// Inserts `value` at `path`; false if something is already there or on the way.
fn insert_nested(dict: &mut Dict, path: &[String], value: Value) -> bool {
    match path {
        [] => false,
        [last] => dict.insert(last.clone(), value).is_none(),
        [first, rest @ ..] => {
            let entry = dict.entry(first.clone()).or_insert_with(|| Value::from(Dict::new()));
            match entry {
                Value::Dict(_, inner) => insert_nested(inner, rest, value),
                _ => false,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw layer: the shape of the merged sources, before defaults and range checks
// ---------------------------------------------------------------------------------------------

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Raw {
    database: RawDatabase,
    money: RawMoney,
    slack: RawSlack,
    executor: RawExecutor,
    payout: RawPayout,
    retry: RawRetry,
    breaker: RawBreaker,
    alerts: RawAlerts,
    log: RawLog,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawBreaker {
    failure_threshold: Option<u32>,
    #[serde(deserialize_with = "duration")]
    open_for: Option<Duration>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawAlerts {
    #[serde(deserialize_with = "float")]
    failure_rate_threshold_pct: Option<f64>,
    #[serde(deserialize_with = "duration")]
    failure_rate_check_interval: Option<Duration>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawDatabase {
    url: Option<String>,
    url_file: Option<PathBuf>,
    pool_size: Option<usize>,
    migrate_on_start: Option<bool>,
    #[serde(deserialize_with = "duration")]
    connect_timeout: Option<Duration>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawMoney {
    base_url: Option<String>,
    api_key: Option<String>,
    api_key_file: Option<PathBuf>,
    rate_limit_per_sec: Option<u32>,
    #[serde(deserialize_with = "duration")]
    rate_slack: Option<Duration>,
    rate_reserve: Option<u32>,
    #[serde(deserialize_with = "duration")]
    timeout: Option<Duration>,
    max_in_flight: Option<usize>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawSlack {
    webhook_url: Option<String>,
    webhook_url_file: Option<PathBuf>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawExecutor {
    batch_size: Option<u32>,
    partitions_medium_from: Option<u64>,
    partitions_large_from: Option<u64>,
    partitions: Option<u16>,
    #[serde(deserialize_with = "duration")]
    idle_poll: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    gate_poll: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    flush_interval: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    drain_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    lease_time: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    lease_check: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    replan_check: Option<Duration>,
    local_takeover: Option<bool>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawPayout {
    max_point_amount: Option<i64>,
    expiry_utc_offset: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawRetry {
    #[serde(deserialize_with = "duration")]
    base_delay: Option<Duration>,
    #[serde(deserialize_with = "float")]
    multiplier: Option<f64>,
    #[serde(deserialize_with = "duration")]
    max_delay: Option<Duration>,
    max_retries: Option<u32>,
    #[serde(deserialize_with = "float")]
    jitter: Option<f64>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    filter: Option<String>,
    #[serde(deserialize_with = "duration")]
    throughput_interval: Option<Duration>,
}

/// `"3s"`, `"250ms"`, `"1h 30m"`; a bare number is refused, as its unit would be a guess.
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration like \"3s\", \"250ms\" or \"5m\"")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            humantime::parse_duration(text.trim()).map_err(|_| {
                E::custom(format!("invalid duration {text:?} (write it like 3s, 250ms or 5m)"))
            })
        }

        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
            Err(E::custom(format!("invalid duration {n}: give a unit, like \"{n}s\" or \"{n}ms\"")))
        }

        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
            Err(E::custom(format!("invalid duration {n}: give a unit, like \"{n}s\" or \"{n}ms\"")))
        }

        fn visit_f64<E: de::Error>(self, n: f64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "invalid duration {n}: write it like \"1500ms\" or \"1s 500ms\""
            )))
        }
    }

    deserializer.deserialize_any(DurationVisitor).map(Some)
}

/// A float from a TOML number or a string. figment's own string-to-number conversion reads
/// short decimals as `f32` (`"0.2"` would become 0.20000000298...), so strings are parsed here.
fn float<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    struct FloatVisitor;

    impl Visitor<'_> for FloatVisitor {
        type Value = f64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number")
        }

        fn visit_f64<E: de::Error>(self, n: f64) -> Result<f64, E> {
            Ok(n)
        }

        fn visit_u64<E: de::Error>(self, n: u64) -> Result<f64, E> {
            Ok(n as f64)
        }

        fn visit_i64<E: de::Error>(self, n: i64) -> Result<f64, E> {
            Ok(n as f64)
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<f64, E> {
            text.trim().parse().map_err(|_| E::custom(format!("expected a number, found {text:?}")))
        }
    }

    deserializer.deserialize_any(FloatVisitor).map(Some)
}

// ---------------------------------------------------------------------------------------------
// Validation: defaults, ranges, and the relations between keys
// ---------------------------------------------------------------------------------------------

/// Validates with the merged sources at hand, so that each error can say where the value came
/// from.
struct Check<'a> {
    figment: &'a Figment,
}

impl Check<'_> {
    fn origin(&self, key: &str) -> Origin {
        Origin::of(self.figment.find_metadata(key), key)
    }

    fn invalid(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_owned(),
            problem: problem.into(),
            origin: self.origin(key),
        }
    }

    /// `value`, or `default` when unset; an error naming `key` unless `ok(value)`.
    fn value<T: Copy>(
        &self,
        key: &str,
        value: Option<T>,
        default: T,
        ok: impl FnOnce(T) -> bool,
        requirement: &str,
    ) -> Result<T, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if ok(v) => Ok(v),
            Some(_) => Err(self.invalid(key, requirement)),
        }
    }

    fn positive(
        &self,
        key: &str,
        value: Option<Duration>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        self.value(key, value, default, |d| !d.is_zero(), "must be above 0")
    }

    /// Chooses between a secret given inline and one in a file; both is an error.
    fn secret<T>(
        &self,
        (key, inline): (&'static str, Option<String>),
        (file_key, file): (&'static str, Option<PathBuf>),
        parse: impl FnOnce(String) -> Result<T, String>,
    ) -> Result<SecretSource<T>, ConfigError> {
        match (non_empty(inline), file.filter(|p| !p.as_os_str().is_empty())) {
            (Some(_), Some(_)) => Err(ConfigError::Conflict {
                first: key,
                first_origin: self.origin(key),
                second: file_key,
                second_origin: self.origin(file_key),
            }),
            (Some(value), None) => {
                parse(value).map(SecretSource::Inline).map_err(|p| self.invalid(key, p))
            }
            (None, Some(path)) => Ok(SecretSource::File(path)),
            (None, None) => Ok(SecretSource::Unset),
        }
    }

    fn settings(&self, raw: Raw, credentials_dir: Option<&Path>) -> Result<Settings, ConfigError> {
        Ok(Settings {
            database: self.database(raw.database)?,
            money: self.money(raw.money, credentials_dir)?,
            slack: self.slack(raw.slack)?,
            executor: self.executor(raw.executor)?,
            payout: self.payout(raw.payout)?,
            retry: self.retry(raw.retry)?,
            breaker: self.breaker(raw.breaker)?,
            alerts: self.alerts(raw.alerts)?,
            log: self.log(raw.log)?,
            file: None,
        })
    }

    fn database(&self, raw: RawDatabase) -> Result<DatabaseSettings, ConfigError> {
        let d = DatabaseSettings::default();
        Ok(DatabaseSettings {
            url: self.secret(
                ("database.url", raw.url),
                ("database.url_file", raw.url_file),
                |url| DatabaseUrl::parse(url).map_err(str::to_owned),
            )?,
            pool_size: self.value(
                "database.pool_size",
                raw.pool_size,
                d.pool_size,
                |n| n >= 1,
                "must be at least 1",
            )?,
            migrate_on_start: raw.migrate_on_start.unwrap_or(d.migrate_on_start),
            connect_timeout: self.positive(
                "database.connect_timeout",
                raw.connect_timeout,
                d.connect_timeout,
            )?,
        })
    }

    fn money(
        &self,
        raw: RawMoney,
        credentials_dir: Option<&Path>,
    ) -> Result<MoneySettings, ConfigError> {
        let d = MoneySettings::default();
        let base_url = match non_empty(raw.base_url) {
            None => None,
            Some(url) => {
                check_http_url(&url, true).map_err(|p| self.invalid("money.base_url", p))?;
                Some(url.trim_end_matches('/').to_owned())
            }
        };
        let mut api_key = self.secret(
            ("money.api_key", raw.api_key),
            ("money.api_key_file", raw.api_key_file),
            |key| Ok(Secret::new(key)),
        )?;
        if let (SecretSource::Unset, Some(dir)) = (&api_key, credentials_dir) {
            let path = dir.join(API_KEY_CREDENTIAL);
            if path.is_file() {
                api_key = SecretSource::Credential(path);
            }
        }
        let rate_limit_per_sec = match raw.rate_limit_per_sec {
            None => d.rate_limit_per_sec,
            Some(n) => NonZeroU32::new(n)
                .ok_or_else(|| self.invalid("money.rate_limit_per_sec", "must be at least 1"))?,
        };
        Ok(MoneySettings {
            base_url,
            api_key,
            rate_limit_per_sec,
            rate_slack: self.value(
                "money.rate_slack",
                raw.rate_slack,
                d.rate_slack,
                |s| s <= Duration::from_millis(200),
                "must be at most 200ms",
            )?,
            rate_reserve: self.value(
                "money.rate_reserve",
                raw.rate_reserve,
                d.rate_reserve,
                |n| n <= 100,
                "must be at most 100 (places per 1,000 of the limit)",
            )?,
            timeout: self.positive("money.timeout", raw.timeout, d.timeout)?,
            max_in_flight: self.value(
                "money.max_in_flight",
                raw.max_in_flight,
                d.max_in_flight,
                |n| n >= 1,
                "must be at least 1",
            )?,
        })
    }

    fn slack(&self, raw: RawSlack) -> Result<SlackSettings, ConfigError> {
        let webhook_url = self.secret(
            ("slack.webhook_url", raw.webhook_url),
            ("slack.webhook_url_file", raw.webhook_url_file),
            |url| check_http_url(&url, false).map(|()| Secret::new(url)),
        )?;
        Ok(SlackSettings { webhook_url })
    }

    fn executor(&self, raw: RawExecutor) -> Result<ExecutorSettings, ConfigError> {
        let d = ExecutorSettings::default();
        let medium = self.value(
            "executor.partitions_medium_from",
            raw.partitions_medium_from,
            d.partitions_medium_from,
            |n| n >= 1,
            "must be at least 1",
        )?;
        let large = raw.partitions_large_from.unwrap_or(d.partitions_large_from);
        if large <= medium {
            return Err(self.invalid(
                "executor.partitions_large_from",
                format!("must be above executor.partitions_medium_from ({medium}), is {large}"),
            ));
        }
        let lease_check = self.positive("executor.lease_check", raw.lease_check, d.lease_check)?;
        let lease_time = raw.lease_time.unwrap_or(d.lease_time);
        if lease_time <= lease_check {
            return Err(self.invalid(
                "executor.lease_time",
                format!(
                    "must be above executor.lease_check ({}), is {}",
                    humantime::format_duration(lease_check),
                    humantime::format_duration(lease_time)
                ),
            ));
        }
        Ok(ExecutorSettings {
            batch_size: self.value(
                "executor.batch_size",
                raw.batch_size,
                d.batch_size,
                |n| (1..=5000).contains(&n),
                "must be from 1 to 5000",
            )?,
            partitions_medium_from: medium,
            partitions_large_from: large,
            partitions: self.value(
                "executor.partitions",
                raw.partitions,
                d.partitions,
                |n| n <= 8,
                "must be from 0 (the 4/6/8 rule) to 8",
            )?,
            idle_poll: self.positive("executor.idle_poll", raw.idle_poll, d.idle_poll)?,
            // The contract: an operator's status change is noticed within 1 s.
            gate_poll: self.value(
                "executor.gate_poll",
                raw.gate_poll,
                d.gate_poll,
                |g| !g.is_zero() && g <= Duration::from_secs(1),
                "must be above 0 and at most 1s (status changes must be noticed within 1 s)",
            )?,
            flush_interval: self.positive(
                "executor.flush_interval",
                raw.flush_interval,
                d.flush_interval,
            )?,
            drain_timeout: raw.drain_timeout.unwrap_or(d.drain_timeout),
            lease_time,
            lease_check,
            replan_check: raw.replan_check.unwrap_or(d.replan_check),
            local_takeover: raw.local_takeover.unwrap_or(d.local_takeover),
        })
    }

    fn payout(&self, raw: RawPayout) -> Result<PayoutSettings, ConfigError> {
        let d = PayoutSettings::default();
        let expiry_utc_offset_secs = match raw.expiry_utc_offset {
            None => d.expiry_utc_offset_secs,
            Some(text) => parse_utc_offset(&text).ok_or_else(|| {
                self.invalid(
                    "payout.expiry_utc_offset",
                    format!("expected an offset like \"+09:00\" or \"-05:30\", found {text:?}"),
                )
            })?,
        };
        Ok(PayoutSettings {
            max_point_amount: self.value(
                "payout.max_point_amount",
                raw.max_point_amount,
                d.max_point_amount,
                |n| n >= 1,
                "must be at least 1",
            )?,
            expiry_utc_offset_secs,
        })
    }

    fn breaker(&self, raw: RawBreaker) -> Result<BreakerSettings, ConfigError> {
        let d = BreakerSettings::default();
        Ok(BreakerSettings {
            failure_threshold: self.value(
                "breaker.failure_threshold",
                raw.failure_threshold,
                d.failure_threshold,
                |n| n >= 1,
                "must be at least 1",
            )?,
            open_for: self.positive("breaker.open_for", raw.open_for, d.open_for)?,
        })
    }

    fn alerts(&self, raw: RawAlerts) -> Result<AlertSettings, ConfigError> {
        let d = AlertSettings::default();
        Ok(AlertSettings {
            failure_rate_threshold_pct: self.value(
                "alerts.failure_rate_threshold_pct",
                raw.failure_rate_threshold_pct,
                d.failure_rate_threshold_pct,
                |p| (0.0..=100.0).contains(&p),
                "must be a percentage from 0 to 100",
            )?,
            // The scheduler runs jobs on whole seconds of a minute (a 6-field cron line).
            failure_rate_check_interval: self.value(
                "alerts.failure_rate_check_interval",
                raw.failure_rate_check_interval,
                d.failure_rate_check_interval,
                |i| {
                    i.subsec_nanos() == 0
                        && (Duration::from_secs(1)..=Duration::from_secs(59)).contains(&i)
                },
                "must be whole seconds from 1s to 59s",
            )?,
        })
    }

    fn retry(&self, raw: RawRetry) -> Result<RetrySettings, ConfigError> {
        let d = RetrySettings::default();
        let base_delay = self.positive("retry.base_delay", raw.base_delay, d.base_delay)?;
        let max_delay = raw.max_delay.unwrap_or(d.max_delay);
        if max_delay < base_delay {
            return Err(self.invalid(
                "retry.max_delay",
                format!(
                    "must be at least retry.base_delay ({}), is {}",
                    humantime::format_duration(base_delay),
                    humantime::format_duration(max_delay)
                ),
            ));
        }
        Ok(RetrySettings {
            base_delay,
            multiplier: self.value(
                "retry.multiplier",
                raw.multiplier,
                d.multiplier,
                |m| m.is_finite() && m >= 1.0,
                "must be a number of at least 1.0",
            )?,
            max_delay,
            max_retries: raw.max_retries.unwrap_or(d.max_retries),
            jitter: self.value(
                "retry.jitter",
                raw.jitter,
                d.jitter,
                |j| (0.0..=1.0).contains(&j),
                "must be from 0 to 1",
            )?,
        })
    }

    fn log(&self, raw: RawLog) -> Result<LogSettings, ConfigError> {
        let d = LogSettings::default();
        let format = match raw.format.as_deref().map(str::trim) {
            None => d.format,
            Some(text) => match text.to_ascii_lowercase().as_str() {
                "auto" => LogFormat::Auto,
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                _ => {
                    return Err(self.invalid(
                        "log.format",
                        format!("expected \"auto\", \"json\" or \"text\", found {text:?}"),
                    ));
                }
            },
        };
        let filter = match raw.filter {
            None => d.filter,
            Some(filter) => {
                tracing_subscriber::EnvFilter::builder().parse(&filter).map_err(|e| {
                    self.invalid(
                        "log.filter",
                        format!("invalid filter {filter:?}: {}", one_line(&e.to_string())),
                    )
                })?;
                filter
            }
        };
        Ok(LogSettings {
            format,
            filter,
            throughput_interval: self.positive(
                "log.throughput_interval",
                raw.throughput_interval,
                d.throughput_interval,
            )?,
        })
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// An `http(s)://host...` URL. The message never contains the URL (a webhook URL is a secret).
fn check_http_url(url: &str, echo: bool) -> Result<(), String> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(rest) if rest.split(['/', '?', '#']).next().is_some_and(|host| !host.is_empty()) => {
            Ok(())
        }
        _ if echo => Err(format!("expected an http:// or https:// URL, found {url:?}")),
        _ => Err("expected an http:// or https:// URL".to_owned()),
    }
}

/// `±HH:MM` to seconds east of UTC; hours up to 23, minutes up to 59.
fn parse_utc_offset(text: &str) -> Option<i32> {
    let bytes = text.as_bytes();
    let [sign, h1, h2, b':', m1, m2] = *bytes else {
        return None;
    };
    let sign = match sign {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digit = |b: u8| b.is_ascii_digit().then(|| i32::from(b - b'0'));
    let hours = digit(h1)? * 10 + digit(h2)?;
    let minutes = digit(m1)? * 10 + digit(m2)?;
    (hours <= 23 && minutes <= 59).then_some(sign * (hours * 3600 + minutes * 60))
}

fn format_utc_offset(secs: i32) -> String {
    let sign = if secs < 0 { '-' } else { '+' };
    let minutes = secs.unsigned_abs() / 60;
    format!("{sign}{:02}:{:02}", minutes / 60, minutes % 60)
}

// ---------------------------------------------------------------------------------------------
// TOML output
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct TomlWriter(String);

impl TomlWriter {
    fn line(&mut self, line: &str) {
        self.0.push_str(line);
        self.0.push('\n');
    }

    fn comment(&mut self, text: &str) {
        self.line(&format!("# {}", one_line(text)));
    }

    fn section(&mut self, name: &str) {
        self.line(&format!("\n[{name}]"));
    }

    fn plain(&mut self, key: &str, value: impl fmt::Display) {
        self.line(&format!("{key} = {value}"));
    }

    fn float(&mut self, key: &str, value: f64) {
        // `Debug` keeps the decimal point (2.0, not 2), so the value stays a TOML float.
        self.line(&format!("{key} = {value:?}"));
    }

    fn string(&mut self, key: &str, value: &str) {
        self.line(&format!("{key} = {}", toml_string(value)));
    }

    fn path(&mut self, key: &str, path: &Path) {
        self.string(key, &path.to_string_lossy());
    }

    fn duration(&mut self, key: &str, value: Duration) {
        self.string(key, &humantime::format_duration(value).to_string());
    }
}

/// A TOML basic string.
fn toml_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use anyhow::{Context, Result, bail};

    const DB_URL: &str = "mysql://payout:hunter2@127.0.0.1:3306/payout";

    fn toml_file(text: &str) -> Result<tempfile::NamedTempFile> {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile()?;
        io::Write::write_all(&mut file, text.as_bytes())?;
        Ok(file)
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    /// Loads expecting a failure; returns its message, checked to be a single line.
    fn load_error(file: Option<&Path>, vars: &[(&str, &str)]) -> Result<String> {
        match Settings::load_from(file, env(vars)) {
            Ok(settings) => bail!("expected an error, loaded {settings:?}"),
            Err(e) => {
                let message = e.to_string();
                assert!(!message.contains('\n'), "not one line: {message}");
                Ok(message)
            }
        }
    }

    #[test]
    fn with_no_file_and_no_environment_every_default_applies() -> Result<()> {
        let s = Settings::load_from(None, env(&[]))?;
        assert_eq!(s.database.pool_size, 16);
        assert!(s.database.migrate_on_start);
        assert_eq!(s.database.connect_timeout, Duration::from_secs(5));
        assert_eq!(s.money.rate_limit_per_sec.get(), 1000);
        assert_eq!(s.money.timeout, Duration::from_secs(3));
        assert_eq!(s.money.max_in_flight, 512);
        assert_eq!(
            s.executor,
            ExecutorSettings {
                batch_size: 250,
                partitions_medium_from: 1_000_001,
                partitions_large_from: 2_000_000,
                partitions: 0,
                idle_poll: Duration::from_millis(200),
                gate_poll: Duration::from_millis(200),
                flush_interval: Duration::from_millis(50),
                drain_timeout: Duration::from_secs(10),
                lease_time: Duration::from_secs(15),
                lease_check: Duration::from_secs(1),
                replan_check: Duration::from_secs(30),
                local_takeover: true,
            }
        );
        assert_eq!(
            s.payout,
            PayoutSettings { max_point_amount: 1_000_000, expiry_utc_offset_secs: 32_400 }
        );
        assert_eq!(
            s.retry,
            RetrySettings {
                base_delay: Duration::from_secs(3),
                multiplier: 2.0,
                max_delay: Duration::from_secs(300),
                max_retries: 5,
                jitter: 0.2,
            }
        );
        assert_eq!(
            s.log,
            LogSettings {
                format: LogFormat::Auto,
                filter: "info".to_owned(),
                throughput_interval: Duration::from_secs(10),
            }
        );
        assert_eq!(
            s.alerts,
            AlertSettings {
                failure_rate_threshold_pct: 1.0,
                failure_rate_check_interval: Duration::from_secs(5),
            }
        );
        assert!(s.slack_webhook_url()?.is_none());
        assert!(s.file.is_none());
        Ok(())
    }

    #[test]
    fn the_file_overrides_defaults() -> Result<()> {
        let file = toml_file(&format!(
            r#"
            [database]
            url = "{DB_URL}"
            pool_size = 4
            migrate_on_start = false
            [money]
            base_url = "https://money.internal:8443/"
            api_key = "k-123"
            rate_limit_per_sec = 250
            timeout = "750ms"
            [executor]
            batch_size = 500
            gate_poll = "1s"
            [payout]
            expiry_utc_offset = "-05:30"
            [retry]
            multiplier = 3
            max_delay = "1h 30m"
            [log]
            format = "json"
            filter = "info,payout_core=debug"
            "#
        ))?;
        let s = Settings::load_from(Some(file.path()), env(&[]))?;
        assert_eq!(s.database.pool_size, 4);
        assert!(!s.database.migrate_on_start);
        assert_eq!(s.database_url()?.expose(), DB_URL);
        assert_eq!(s.money_base_url()?, "https://money.internal:8443");
        assert_eq!(s.money_api_key()?.expose(), "k-123");
        assert_eq!(s.money.rate_limit_per_sec.get(), 250);
        assert_eq!(s.money.timeout, Duration::from_millis(750));
        assert_eq!(s.executor.batch_size, 500);
        assert_eq!(s.executor.gate_poll, Duration::from_secs(1));
        assert_eq!(s.payout.expiry_utc_offset_secs, -(5 * 3600 + 30 * 60));
        assert!((s.retry.multiplier - 3.0).abs() < f64::EPSILON);
        assert_eq!(s.retry.max_delay, Duration::from_secs(5400));
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.file.as_deref(), Some(file.path()));
        Ok(())
    }

    #[test]
    fn environment_variables_override_the_file_and_arrive_as_strings() -> Result<()> {
        let file = toml_file(
            "[money]\nrate_limit_per_sec = 250\ntimeout = \"1s\"\n[retry]\njitter = 0.5\n",
        )?;
        let s = Settings::load_from(
            Some(file.path()),
            env(&[
                ("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC", "400"),
                ("PAYOUTD_MONEY__TIMEOUT", "2s"),
                ("payoutd_database__pool_size", "8"),
                ("PAYOUTD_DATABASE__MIGRATE_ON_START", "false"),
                ("PAYOUTD_RETRY__JITTER", "0.1"),
                ("PAYOUTD_PAYOUT__MAX_POINT_AMOUNT", "5000"),
                ("PAYOUTD_MONEY__API_KEY", "0123"),
            ]),
        )?;
        assert_eq!(s.money.rate_limit_per_sec.get(), 400);
        assert_eq!(s.money.timeout, Duration::from_secs(2));
        assert_eq!(s.database.pool_size, 8);
        assert!(!s.database.migrate_on_start);
        assert_eq!(s.retry.jitter.to_bits(), 0.1_f64.to_bits(), "parsed as f64, not via f32");
        assert_eq!(s.payout.max_point_amount, 5000);
        assert_eq!(s.money_api_key()?.expose(), "0123", "a numeric-looking secret stays verbatim");
        Ok(())
    }

    #[test]
    fn environment_variables_without_a_double_underscore_are_not_keys() -> Result<()> {
        let s = Settings::load_from(
            None,
            env(&[
                ("PAYOUTD_CONFIG", "/nowhere.toml"),
                ("PAYOUTD_TEST_DATABASE_URL", DB_URL),
                ("OTHER__THING", "x"),
            ]),
        )?;
        assert!(matches!(s.database_url(), Err(ConfigError::Missing { key: "database.url", .. })));
        Ok(())
    }

    #[test]
    fn an_empty_environment_variable_clears_the_files_value() -> Result<()> {
        let file = toml_file(
            "[database]\nurl_file = \"/run/secrets/db\"\n[slack]\nwebhook_url = \"https://hooks.example/x\"\n",
        )?;
        let s = Settings::load_from(
            Some(file.path()),
            env(&[
                ("PAYOUTD_DATABASE__URL_FILE", ""),
                ("PAYOUTD_DATABASE__URL", DB_URL),
                ("PAYOUTD_SLACK__WEBHOOK_URL", ""),
            ]),
        )?;
        assert_eq!(s.database_url()?.expose(), DB_URL);
        assert!(s.slack_webhook_url()?.is_none());
        Ok(())
    }

    #[test]
    fn an_unknown_key_in_the_file_is_named_with_the_file() -> Result<()> {
        let file = toml_file("[money]\nrate_limt_per_sec = 5\n")?;
        let message = load_error(Some(file.path()), &[])?;
        assert_eq!(
            message,
            format!(
                "unknown configuration key money.rate_limt_per_sec (in {}); did you mean money.rate_limit_per_sec?",
                file.path().display()
            )
        );

        let file = toml_file("[moneys]\nrate_limit_per_sec = 5\n")?;
        let message = load_error(Some(file.path()), &[])?;
        assert_eq!(
            message,
            format!(
                "unknown configuration key moneys.rate_limit_per_sec (in {}); did you mean money?",
                file.path().display()
            )
        );

        let file = toml_file("[log]\nverbosity = 3\n")?;
        let message = load_error(Some(file.path()), &[])?;
        assert_eq!(
            message,
            format!("unknown configuration key log.verbosity (in {})", file.path().display())
        );
        Ok(())
    }

    #[test]
    fn an_unknown_key_in_the_environment_is_named_with_the_variable() -> Result<()> {
        let message = load_error(None, &[("PAYOUTD_MONEY__RATE_LIMT_PER_SEC", "5")])?;
        assert_eq!(
            message,
            "unknown configuration key money.rate_limt_per_sec \
             (from environment variable PAYOUTD_MONEY__RATE_LIMT_PER_SEC); did you mean money.rate_limit_per_sec?"
        );
        let message =
            load_error(None, &[("PAYOUTD_SLAK__WEBHOOK_URL", "https://hooks.example/x")])?;
        assert_eq!(
            message,
            "unknown configuration key slak.webhook_url \
             (from environment variable PAYOUTD_SLAK__WEBHOOK_URL); did you mean slack?"
        );
        let message = load_error(None, &[("PAYOUTD_MONEY__", "5")])?;
        assert!(message.contains("PAYOUTD_MONEY__"), "{message}");
        Ok(())
    }

    #[test]
    fn one_key_set_by_two_environment_variables_is_refused() -> Result<()> {
        let message = load_error(
            None,
            &[("PAYOUTD_MONEY__TIMEOUT", "1s"), ("payoutd_money__timeout", "2s")],
        )?;
        assert_eq!(
            message,
            "money.timeout: set by more than one environment variable \
             (from environment variable payoutd_money__timeout)"
        );
        let message = load_error(
            None,
            &[("PAYOUTD_MONEY__TIMEOUT", "1s"), ("PAYOUTD_MONEY__TIMEOUT__X", "2s")],
        )?;
        assert!(message.starts_with("money.timeout.x: set by more than one"), "{message}");
        Ok(())
    }

    #[test]
    fn a_bad_duration_names_the_key_and_the_value() -> Result<()> {
        let file = toml_file("[money]\ntimeout = \"3 parsecs\"\n")?;
        let message = load_error(Some(file.path()), &[])?;
        assert!(message.starts_with("money.timeout: invalid duration \"3 parsecs\""), "{message}");
        assert!(message.contains(&file.path().display().to_string()), "{message}");

        let message = load_error(None, &[("PAYOUTD_EXECUTOR__IDLE_POLL", "soon")])?;
        assert!(message.starts_with("executor.idle_poll: invalid duration \"soon\""), "{message}");
        assert!(message.contains("PAYOUTD_EXECUTOR__IDLE_POLL"), "{message}");

        let file = toml_file("[money]\ntimeout = 3\n")?;
        let message = load_error(Some(file.path()), &[])?;
        assert!(message.starts_with("money.timeout: invalid duration 3: give a unit"), "{message}");
        Ok(())
    }

    #[test]
    fn the_rate_reserve_is_read_and_bounded() -> Result<()> {
        assert_eq!(Settings::load_from(None, env(&[]))?.money.rate_reserve, 2);
        let s = Settings::load_from(None, env(&[("PAYOUTD_MONEY__RATE_RESERVE", "0")]))?;
        assert_eq!(s.money.rate_reserve, 0);
        let file = toml_file("[money]\nrate_reserve = 5\n")?;
        assert_eq!(Settings::load_from(Some(file.path()), env(&[]))?.money.rate_reserve, 5);
        let message = load_error(None, &[("PAYOUTD_MONEY__RATE_RESERVE", "101")])?;
        assert_eq!(
            message,
            "money.rate_reserve: must be at most 100 (places per 1,000 of the limit) (from environment variable PAYOUTD_MONEY__RATE_RESERVE)"
        );
        Ok(())
    }

    #[test]
    fn values_out_of_range_are_refused_naming_the_key() -> Result<()> {
        let message = load_error(None, &[("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC", "0")])?;
        assert_eq!(
            message,
            "money.rate_limit_per_sec: must be at least 1 (from environment variable PAYOUTD_MONEY__RATE_LIMIT_PER_SEC)"
        );
        let file = toml_file("[money]\nrate_limit_per_sec = 0\n")?;
        let message = load_error(Some(file.path()), &[])?;
        assert!(
            message.starts_with("money.rate_limit_per_sec: must be at least 1 (in "),
            "{message}"
        );

        for (var, value, key) in [
            ("PAYOUTD_MONEY__TIMEOUT", "0s", "money.timeout"),
            ("PAYOUTD_MONEY__MAX_IN_FLIGHT", "0", "money.max_in_flight"),
            ("PAYOUTD_EXECUTOR__BATCH_SIZE", "5001", "executor.batch_size"),
            ("PAYOUTD_EXECUTOR__GATE_POLL", "1500ms", "executor.gate_poll"),
            (
                "PAYOUTD_EXECUTOR__PARTITIONS_LARGE_FROM",
                "1000001",
                "executor.partitions_large_from",
            ),
            ("PAYOUTD_PAYOUT__MAX_POINT_AMOUNT", "0", "payout.max_point_amount"),
            ("PAYOUTD_RETRY__MULTIPLIER", "0.5", "retry.multiplier"),
            ("PAYOUTD_RETRY__JITTER", "1.5", "retry.jitter"),
            ("PAYOUTD_RETRY__MAX_DELAY", "1s", "retry.max_delay"),
            (
                "PAYOUTD_ALERTS__FAILURE_RATE_THRESHOLD_PCT",
                "101",
                "alerts.failure_rate_threshold_pct",
            ),
            (
                "PAYOUTD_ALERTS__FAILURE_RATE_THRESHOLD_PCT",
                "-1",
                "alerts.failure_rate_threshold_pct",
            ),
            (
                "PAYOUTD_ALERTS__FAILURE_RATE_CHECK_INTERVAL",
                "0s",
                "alerts.failure_rate_check_interval",
            ),
            (
                "PAYOUTD_ALERTS__FAILURE_RATE_CHECK_INTERVAL",
                "1500ms",
                "alerts.failure_rate_check_interval",
            ),
            (
                "PAYOUTD_ALERTS__FAILURE_RATE_CHECK_INTERVAL",
                "1m",
                "alerts.failure_rate_check_interval",
            ),
            ("PAYOUTD_LOG__FORMAT", "xml", "log.format"),
            ("PAYOUTD_LOG__FILTER", "info,[", "log.filter"),
            ("PAYOUTD_MONEY__BASE_URL", "money.internal", "money.base_url"),
            ("PAYOUTD_DATABASE__URL", "postgres://u:p@h/db", "database.url"),
        ] {
            let message = load_error(None, &[(var, value)])?;
            assert!(message.starts_with(&format!("{key}: ")), "{var}={value}: {message}");
            assert!(
                message.ends_with(&format!("(from environment variable {var})")),
                "{var}={value}: {message}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_value_of_the_wrong_type_names_the_key() -> Result<()> {
        let message = load_error(None, &[("PAYOUTD_MONEY__RATE_LIMIT_PER_SEC", "fast")])?;
        assert!(
            message.starts_with("money.rate_limit_per_sec: expected a whole number"),
            "{message}"
        );
        assert!(message.contains("\"fast\""), "{message}");
        let message = load_error(None, &[("PAYOUTD_DATABASE__MIGRATE_ON_START", "perhaps")])?;
        assert!(
            message.starts_with("database.migrate_on_start: expected true or false"),
            "{message}"
        );
        let file = toml_file("money = 5\n")?;
        let message = load_error(Some(file.path()), &[])?;
        assert!(message.starts_with("money: expected "), "{message}");
        Ok(())
    }

    #[test]
    fn a_mistyped_secret_is_not_echoed_in_the_error() -> Result<()> {
        let file = toml_file("[money]\napi_key = 98765432\n")?;
        let message = load_error(Some(file.path()), &[])?;
        assert!(message.starts_with("money.api_key: expected a string (in "), "{message}");
        assert!(!message.contains("98765"), "{message}");

        let file = toml_file("[database]\nurl = \"mysql:/u:pw-98765@h/db\"\n")?;
        let message = load_error(Some(file.path()), &[])?;
        assert!(message.starts_with("database.url: expected a URL like mysql://"), "{message}");
        assert!(!message.contains("98765"), "{message}");

        let message =
            load_error(None, &[("PAYOUTD_SLACK__WEBHOOK_URL", "hooks.example/T0/secret-token")])?;
        assert!(message.starts_with("slack.webhook_url: "), "{message}");
        assert!(!message.contains("secret-token"), "{message}");
        Ok(())
    }

    #[test]
    fn a_missing_database_url_is_named_when_asked_for() -> Result<()> {
        let s = Settings::load_from(None, env(&[]))?;
        let message = s.database_url().err().context("expected an error")?.to_string();
        assert_eq!(
            message,
            "missing required configuration key database.url (or set PAYOUTD_DATABASE__URL, or database.url_file)"
        );
        let message = s.require_run().err().context("expected an error")?.to_string();
        assert!(message.contains("database.url"), "{message}");
        Ok(())
    }

    #[test]
    fn run_requires_the_money_url_and_key_but_other_commands_do_not() -> Result<()> {
        let s = Settings::load_from(None, env(&[("PAYOUTD_DATABASE__URL", DB_URL)]))?;
        assert!(s.database_url().is_ok());
        let message = s.require_run().err().context("expected an error")?.to_string();
        assert_eq!(
            message,
            "missing required configuration key money.base_url (or set PAYOUTD_MONEY__BASE_URL)"
        );

        let s = Settings::load_from(
            None,
            env(&[
                ("PAYOUTD_DATABASE__URL", DB_URL),
                ("PAYOUTD_MONEY__BASE_URL", "http://127.0.0.1:9000"),
            ]),
        )?;
        let message = s.require_run().err().context("expected an error")?.to_string();
        assert!(message.starts_with("missing required configuration key money.api_key (or set PAYOUTD_MONEY__API_KEY, money.api_key_file"));

        let s = Settings::load_from(
            None,
            env(&[
                ("PAYOUTD_DATABASE__URL", DB_URL),
                ("PAYOUTD_MONEY__BASE_URL", "http://127.0.0.1:9000"),
                ("PAYOUTD_MONEY__API_KEY", "k"),
            ]),
        )?;
        let run = s.require_run()?;
        assert_eq!(run.money_base_url, "http://127.0.0.1:9000");
        assert_eq!(run.money_api_key.expose(), "k");
        assert!(run.slack_webhook_url.is_none());
        Ok(())
    }

    #[test]
    fn the_api_key_file_is_read_when_asked_for_without_its_trailing_newline() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let key_file = dir.path().join("api-key");
        fs::write(&key_file, "k-from-file\n")?;
        let s = Settings::load_from(
            None,
            env(&[("PAYOUTD_MONEY__API_KEY_FILE", &key_file.to_string_lossy())]),
        )?;
        assert_eq!(s.money_api_key()?.expose(), "k-from-file");

        fs::write(&key_file, "k-crlf\r\n")?;
        assert_eq!(s.money_api_key()?.expose(), "k-crlf");

        fs::write(&key_file, "\n")?;
        let message = s.money_api_key().err().context("expected an error")?.to_string();
        assert!(
            message.starts_with("money.api_key_file: ") && message.ends_with("the file is empty"),
            "{message}"
        );

        // Loading does not read the file: only the commands that need the key fail.
        let missing = dir.path().join("missing");
        let s = Settings::load_from(
            None,
            env(&[("PAYOUTD_MONEY__API_KEY_FILE", &missing.to_string_lossy())]),
        )?;
        let message = s.money_api_key().err().context("expected an error")?.to_string();
        assert!(
            message.starts_with(&format!("money.api_key_file: cannot read {}", missing.display())),
            "{message}"
        );
        Ok(())
    }

    #[test]
    fn the_database_url_file_is_checked_when_read() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let url_file = dir.path().join("db-url");
        fs::write(&url_file, format!("{DB_URL}\n"))?;
        let s = Settings::load_from(
            None,
            env(&[("PAYOUTD_DATABASE__URL_FILE", &url_file.to_string_lossy())]),
        )?;
        assert_eq!(s.database_url()?.expose(), DB_URL);

        fs::write(&url_file, "postgres://u:hunter2@h/db\n")?;
        let message = s.database_url().err().context("expected an error")?.to_string();
        assert!(
            message.starts_with("database.url_file: ") && !message.contains("hunter2"),
            "{message}"
        );
        Ok(())
    }

    #[test]
    fn a_systemd_credential_supplies_the_api_key_when_nothing_else_does() -> Result<()> {
        let dir = tempfile::tempdir()?;
        fs::write(dir.path().join("money-api-key"), "k-credential\n")?;
        let credentials = dir.path().to_string_lossy().into_owned();

        let s = Settings::load_from(None, env(&[("CREDENTIALS_DIRECTORY", &credentials)]))?;
        assert_eq!(s.money_api_key()?.expose(), "k-credential");
        assert!(s.masked_toml().contains("# api_key: from systemd credential"));

        let s = Settings::load_from(
            None,
            env(&[("CREDENTIALS_DIRECTORY", &credentials), ("PAYOUTD_MONEY__API_KEY", "k-env")]),
        )?;
        assert_eq!(
            s.money_api_key()?.expose(),
            "k-env",
            "an explicit key wins over the credential"
        );

        let empty = tempfile::tempdir()?;
        let s = Settings::load_from(
            None,
            env(&[("CREDENTIALS_DIRECTORY", &empty.path().to_string_lossy())]),
        )?;
        assert!(matches!(
            s.money_api_key(),
            Err(ConfigError::Missing { key: "money.api_key", .. })
        ));
        Ok(())
    }

    #[test]
    fn a_secret_given_both_inline_and_by_file_is_refused() -> Result<()> {
        let file = toml_file("[money]\napi_key_file = \"/run/secrets/money\"\n")?;
        let message = load_error(Some(file.path()), &[("PAYOUTD_MONEY__API_KEY", "k")])?;
        assert_eq!(
            message,
            format!(
                "money.api_key (from environment variable PAYOUTD_MONEY__API_KEY) and money.api_key_file (in {}) \
                 are both set; set only one",
                file.path().display()
            )
        );
        Ok(())
    }

    #[test]
    fn secrets_are_masked_in_debug_and_in_the_effective_toml() -> Result<()> {
        let s = Settings::load_from(
            None,
            env(&[
                ("PAYOUTD_DATABASE__URL", DB_URL),
                ("PAYOUTD_MONEY__BASE_URL", "https://money.internal"),
                ("PAYOUTD_MONEY__API_KEY", "very-secret-key"),
                ("PAYOUTD_SLACK__WEBHOOK_URL", "https://hooks.example/T0/very-secret-hook"),
            ]),
        )?;
        let run = s.require_run()?;
        let url = s.database_url()?;
        for text in [format!("{s:?}"), format!("{run:?}"), format!("{url:?}"), s.masked_toml()] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(!text.contains("very-secret"), "{text}");
        }
        assert_eq!(url.to_string(), "mysql://payout:***@127.0.0.1:3306/payout");
        assert_eq!(format!("{:?}", run.money_api_key), "***");
        let toml = s.masked_toml();
        assert!(toml.contains("url = \"mysql://payout:***@127.0.0.1:3306/payout\""), "{toml}");
        assert!(toml.contains("api_key = \"***\""), "{toml}");
        assert!(toml.contains("webhook_url = \"***\""), "{toml}");
        Ok(())
    }

    #[test]
    fn the_effective_toml_loads_back_to_the_same_settings() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let key_file = dir.path().join("key \"quoted\"");
        let s = Settings::load_from(
            None,
            env(&[
                ("PAYOUTD_DATABASE__URL", DB_URL),
                ("PAYOUTD_MONEY__API_KEY_FILE", &key_file.to_string_lossy()),
                ("PAYOUTD_EXECUTOR__DRAIN_TIMEOUT", "1500ms"),
                ("PAYOUTD_PAYOUT__EXPIRY_UTC_OFFSET", "-05:30"),
                ("PAYOUTD_RETRY__JITTER", "0.25"),
                ("PAYOUTD_ALERTS__FAILURE_RATE_THRESHOLD_PCT", "2.5"),
                ("PAYOUTD_ALERTS__FAILURE_RATE_CHECK_INTERVAL", "10s"),
                ("PAYOUTD_LOG__FILTER", "warn,payoutd=debug"),
            ]),
        )?;
        let file = toml_file(&s.masked_toml())?;
        let back = Settings::load_from(Some(file.path()), env(&[]))?;
        assert_eq!(back.executor, s.executor);
        assert_eq!(back.payout, s.payout);
        assert_eq!(back.retry, s.retry);
        assert_eq!(back.alerts, s.alerts);
        assert_eq!(back.log, s.log);
        assert_eq!(back.database.pool_size, s.database.pool_size);
        assert_eq!(back.money.timeout, s.money.timeout);
        assert_eq!(back.database_url()?.to_string(), s.database_url()?.to_string());
        assert!(matches!(&back.money.api_key, SecretSource::File(p) if *p == key_file));
        Ok(())
    }

    #[test]
    fn utc_offsets_are_read_as_signed_hours_and_minutes() {
        assert_eq!(parse_utc_offset("+09:00"), Some(32_400));
        assert_eq!(parse_utc_offset("-05:30"), Some(-19_800));
        assert_eq!(parse_utc_offset("+00:00"), Some(0));
        for bad in ["+9", "09:00", "+9:00", "+09:0", "+24:00", "+09:60", "+09-00", "＋09:00", ""] {
            assert_eq!(parse_utc_offset(bad), None, "{bad:?}");
        }
        assert_eq!(format_utc_offset(-19_800), "-05:30");
        assert_eq!(format_utc_offset(32_400), "+09:00");
    }

    #[test]
    fn a_bad_utc_offset_is_named() -> Result<()> {
        let message = load_error(None, &[("PAYOUTD_PAYOUT__EXPIRY_UTC_OFFSET", "+9")])?;
        assert_eq!(
            message,
            "payout.expiry_utc_offset: expected an offset like \"+09:00\" or \"-05:30\", found \"+9\" \
             (from environment variable PAYOUTD_PAYOUT__EXPIRY_UTC_OFFSET)"
        );
        Ok(())
    }

    #[test]
    fn database_url_passwords_are_masked() {
        for (url, masked) in [
            (
                "mysql://payout:secret@127.0.0.1:3306/payout",
                "mysql://payout:***@127.0.0.1:3306/payout",
            ),
            ("mysql://payout@db/payout", "mysql://payout@db/payout"),
            ("mysql://db:3306/payout", "mysql://db:3306/payout"),
            ("mysql://u:p@ss/w@rd@db/x?ssl=true", "mysql://u:***@db/x?ssl=true"),
            ("mysql://u:@db/x", "mysql://u:***@db/x"),
            ("not a url", "***"),
        ] {
            assert_eq!(mask_url_password(url), masked, "{url}");
        }
    }

    #[test]
    fn a_toml_syntax_error_is_one_line_with_the_place() -> Result<()> {
        let file = toml_file("[money]\ntimeout = 3s\n")?;
        let message = load_error(Some(file.path()), &[])?;
        assert!(
            message.starts_with(&format!(
                "configuration file {} is not valid TOML: line 2, column ",
                file.path().display()
            )),
            "{message}"
        );
        Ok(())
    }

    #[test]
    fn a_named_config_file_must_exist_but_the_default_may_be_absent() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let missing = dir.path().join("payoutd.toml");
        let error = config_file_to_read(Some(&missing), true).err().context("expected an error")?;
        assert_eq!(
            error.to_string(),
            format!("configuration file {} does not exist", missing.display())
        );
        assert_eq!(config_file_to_read(Some(&missing), false)?, None);

        fs::write(&missing, "")?;
        assert_eq!(config_file_to_read(Some(&missing), true)?, Some(missing.clone()));
        let error = Settings::load(Some(&dir.path().join("nope.toml")), true)
            .err()
            .context("expected an error")?;
        assert!(matches!(error, ConfigError::FileNotFound { .. }));
        Ok(())
    }

    /// `(section, key, line)` for every `key = value` line in `toml`, commented out or not.
    fn key_lines(toml: &str) -> Vec<(String, String, String)> {
        let mut section = String::new();
        let mut lines = Vec::new();
        for line in toml.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            let line = line.strip_prefix("# ").unwrap_or(line);
            if let Some((key, _)) = line.split_once(" = ")
                && !key.is_empty()
                && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            {
                lines.push((section.clone(), key.to_owned(), line.to_owned()));
            }
        }
        lines
    }

    #[test]
    fn the_example_file_lists_every_key_with_its_default() -> Result<()> {
        let example = key_lines(include_str!("../payoutd.example.toml"));
        let defaults = key_lines(&Settings::load_from(None, env(&[]))?.masked_toml());

        let mut expected: Vec<(String, String)> =
            defaults.iter().map(|(s, k, _)| (s.clone(), k.clone())).collect();
        for (section, key) in [
            ("database", "url"),
            ("database", "url_file"),
            ("money", "base_url"),
            ("money", "api_key"),
            ("money", "api_key_file"),
            ("slack", "webhook_url"),
            ("slack", "webhook_url_file"),
        ] {
            expected.push((section.to_owned(), key.to_owned()));
        }
        let mut listed: Vec<(String, String)> =
            example.iter().map(|(s, k, _)| (s.clone(), k.clone())).collect();
        expected.sort();
        listed.sort();
        assert_eq!(listed, expected);

        for (section, key, line) in &example {
            let file = toml_file(&format!("[{section}]\n{line}\n"))?;
            Settings::load_from(Some(file.path()), env(&[]))
                .with_context(|| format!("example line for {section}.{key}: {line}"))?;
            if let Some((_, _, default)) =
                defaults.iter().find(|(s, k, _)| s == section && k == key)
            {
                assert_eq!(line, default, "the example's default for {section}.{key}");
            }
        }
        Ok(())
    }

    #[test]
    fn env_var_names_follow_the_contract() {
        assert_eq!(env_var_name("money.rate_limit_per_sec"), "PAYOUTD_MONEY__RATE_LIMIT_PER_SEC");
        assert_eq!(env_var_name("database.url"), "PAYOUTD_DATABASE__URL");
    }
}
