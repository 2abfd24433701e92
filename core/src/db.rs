//! MySQL connections: the pool, per-connection session settings and embedded migrations.
//!
//! Every pooled connection runs at READ COMMITTED (concurrent `SKIP LOCKED` claims deadlock and
//! skip rows at REPEATABLE READ) with the session time zone at UTC.

use std::time::Duration;

use diesel_async::AsyncMysqlConnection;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures::FutureExt;
use mysql_async::prelude::Queryable;
use secrecy::{ExposeSecret, SecretString};

/// The schema, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

pub type DbPool = Pool<AsyncMysqlConnection>;
pub type DbConn = Object<AsyncMysqlConnection>;

/// Every connection's session settings, sent once as one multi-statement query (one round trip)
/// right after the connection is made. Not as mysql_async `init` commands: those are one round
/// trip each, and with `prefer_socket` (its default) a TCP connection to a local server is
/// replaced by one over the server's Unix socket and the commands run on it twice.
/// `innodb_lock_wait_timeout`: fail a lock wait fast, callers retry (the default is 50 s).
const SESSION_SETUP: &str = "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED; \
     SET time_zone = '+00:00', innodb_lock_wait_timeout = 10";

/// Database errors as the engine sees them.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database unavailable: {0}")]
    Pool(String),
    #[error("database error: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("migration failed: {0}")]
    Migration(String),
}

impl DbError {
    /// Deadlocks (1213) and lock wait timeouts (1205) are retried by the caller.
    pub fn is_retryable_lock(&self) -> bool {
        match self {
            DbError::Query(diesel::result::Error::DatabaseError(_, info)) => {
                let m = info.message();
                m.contains("Deadlock") || m.contains("Lock wait timeout")
            }
            DbError::Query(_) | DbError::Pool(_) | DbError::Migration(_) => false,
        }
    }
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct DbSettings {
    pub url: SecretString,
    pub pool_size: usize,
    pub connect_timeout: Duration,
}

async fn establish(url: &str) -> diesel::ConnectionResult<AsyncMysqlConnection> {
    let opts = mysql_async::Opts::from_url(url)
        .map_err(|e| diesel::ConnectionError::InvalidConnectionUrl(e.to_string()))?;
    let builder =
        mysql_async::OptsBuilder::from_opts(opts).stmt_cache_size(0).client_found_rows(true);
    let bad = |e: mysql_async::Error| diesel::ConnectionError::BadConnection(e.to_string());
    let mut conn = mysql_async::Conn::new(builder).await.map_err(bad)?;
    conn.query_drop(SESSION_SETUP).await.map_err(bad)?;
    AsyncMysqlConnection::try_from(conn).await
}

/// One connection for a short command (`campaign status`, `campaign list`), in fewer round
/// trips than a pooled one: operators run these while a daemon keeps the machine busy, and there
/// every round trip waits its turn for a CPU. It stays on the connection the URL names
/// (mysql_async otherwise asks a local server for its Unix socket and connects again there:
/// a second handshake), and diesel-async's four session commands go as text init commands, one
/// round trip each ([`AsyncMysqlConnection::try_from`], which the pool's connections go
/// through, prepares and runs each: two). The session settings are the pool's.
pub async fn connect_one(url: &str, timeout: Duration) -> Result<AsyncMysqlConnection, DbError> {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    let url = if url.contains("prefer_socket=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&prefer_socket=false")
    } else {
        format!("{url}?prefer_socket=false")
    };
    let failed = |e: String| DbError::Pool(tidy(&scrub(&e)));
    let mut conn = tokio::time::timeout(timeout, AsyncMysqlConnection::establish(&url))
        .await
        .map_err(|_| failed(format!("no connection within {timeout:?}")))?
        .map_err(|e| failed(e.to_string()))?;
    conn.batch_execute(SESSION_SETUP).await?;
    Ok(conn)
}

/// Builds the pool; connections are opened lazily. Use [`check`] to fail fast at start.
pub fn pool(settings: &DbSettings) -> Result<DbPool, DbError> {
    let mut config = ManagerConfig::default();
    config.custom_setup = Box::new(|url| establish(url).boxed());
    let manager = AsyncDieselConnectionManager::<AsyncMysqlConnection>::new_with_config(
        settings.url.expose_secret(),
        config,
    );
    Pool::builder(manager)
        .max_size(settings.pool_size.max(2))
        .runtime(deadpool::Runtime::Tokio1)
        .wait_timeout(Some(settings.connect_timeout))
        .create_timeout(Some(settings.connect_timeout))
        .recycle_timeout(Some(settings.connect_timeout))
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// Takes a connection from the pool.
pub async fn conn(pool: &DbPool) -> Result<DbConn, DbError> {
    pool.get().await.map_err(|e| DbError::Pool(tidy(&scrub(&e.to_string()))))
}

/// Drops the pool's generic prefix and repeated parts from a connection error
/// ("Error occurred while creating a new object: Input/output error: Input/output error: …").
fn tidy(msg: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in msg.split(": ") {
        if part == "Error occurred while creating a new object" || parts.last() == Some(&part) {
            continue;
        }
        parts.push(part);
    }
    parts.join(": ")
}

/// Removes a password from a message that may quote a connection URL.
fn scrub(msg: &str) -> String {
    // mysql_async never prints the URL, but keep a guard: anything like "//user:pass@" loses pass.
    match (msg.find("://"), msg.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let head = &msg[..s + 3];
            let creds = &msg[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{head}{user}:***{}", &msg[at..])
        }
        _ => msg.to_owned(),
    }
}

/// Applies pending migrations. Needs the multi-thread tokio runtime.
pub async fn migrate(pool: &DbPool) -> Result<Vec<String>, DbError> {
    let conn = conn(pool).await?;
    let mut harness = diesel_async::AsyncMigrationHarness::new(conn);
    let applied = harness
        .run_pending_migrations(MIGRATIONS)
        .map_err(|e| DbError::Migration(e.to_string()))?;
    Ok(applied.iter().map(|v| v.to_string()).collect())
}

/// Checks that the database answers.
pub async fn check(pool: &DbPool) -> Result<(), DbError> {
    use diesel_async::RunQueryDsl;
    let mut c = conn(pool).await?;
    diesel::sql_query("SELECT 1").execute(&mut *c).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn connection_errors_are_tidied() {
        assert_eq!(
            super::tidy(
                "Error occurred while creating a new object: Input/output error: Input/output error: Connection refused (os error 111)"
            ),
            "Input/output error: Connection refused (os error 111)"
        );
    }

    #[test]
    fn passwords_are_scrubbed() {
        assert_eq!(
            super::scrub("cannot reach mysql://payout:secret@db:3306/x"),
            "cannot reach mysql://payout:***@db:3306/x"
        );
        assert_eq!(super::scrub("timeout"), "timeout");
    }
}
