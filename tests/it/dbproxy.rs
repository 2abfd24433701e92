//! A TCP proxy between payoutd and MariaDB that can take the database away: [`DbProxy::cut`]
//! closes every proxied connection and refuses new ones (accepts, then closes them at once) until
//! [`DbProxy::restore`]. To the daemon this looks like a database server that went down and came
//! back: established connections break, reconnects fail, then succeed again.
//!
//! The test's own connections go to MariaDB directly, so a test can look at the database while
//! the daemon cannot.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

use crate::support::{TestDb, server_url};

/// The proxy's switch and the connections it carries. `cut` and the connection list share one
/// lock, so a connection accepted while [`DbProxy::cut`] runs is either closed by it or refused.
#[derive(Default)]
struct Inner {
    cut: bool,
    connections: Vec<AbortHandle>,
}

#[derive(Default)]
struct State {
    inner: Mutex<Inner>,
    accepted: AtomicU64,
    refused: AtomicU64,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running proxy; dropping it closes the listener and every connection.
pub struct DbProxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept_task: JoinHandle<()>,
}

impl DbProxy {
    /// Listens on a free loopback port and forwards to the test MariaDB server.
    pub async fn start() -> anyhow::Result<DbProxy> {
        let upstream = upstream_address(&server_url())?;
        let listener = TcpListener::bind("127.0.0.1:0").await.context("proxy bind")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let accept_task = tokio::spawn(accept_loop(listener, upstream, state.clone()));
        Ok(DbProxy { addr, state, accept_task })
    }

    /// A database URL for `db` that goes through this proxy (same user and password).
    ///
    /// `prefer_socket=false`: mysql_async otherwise notices that the server is local, asks it for
    /// its Unix socket and reconnects there, bypassing the proxy.
    pub fn url(&self, db: &TestDb) -> anyhow::Result<String> {
        let server = server_url();
        let rest = server.strip_prefix("mysql://").context("server URL is not mysql://")?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let user = authority.rsplit_once('@').map(|(user, _)| format!("{user}@"));
        Ok(format!(
            "mysql://{}{}/{}?prefer_socket=false",
            user.unwrap_or_default(),
            self.addr,
            db.name
        ))
    }

    /// Closes every proxied connection and refuses new ones until [`DbProxy::restore`].
    pub fn cut(&self) {
        let mut inner = self.state.lock();
        inner.cut = true;
        for connection in inner.connections.drain(..) {
            connection.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.state.lock().cut = false;
    }

    /// Connections accepted and forwarded since start.
    pub fn accepted_total(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// Connections refused while cut.
    pub fn refused_total(&self) -> u64 {
        self.state.refused.load(Ordering::Relaxed)
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        for connection in self.state.lock().connections.drain(..) {
            connection.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: String, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let mut inner = state.lock();
        if inner.cut {
            state.refused.fetch_add(1, Ordering::Relaxed);
            drop(client);
            continue;
        }
        state.accepted.fetch_add(1, Ordering::Relaxed);
        inner.connections.retain(|c| !c.is_finished());
        let task = tokio::spawn(forward(client, upstream.clone()));
        inner.connections.push(task.abort_handle());
    }
}

/// Copies bytes both ways until either side closes; aborting the task closes both sockets.
async fn forward(mut client: TcpStream, upstream: String) {
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

/// `host:port` of a `mysql://[user[:password]@]host[:port][/...]` URL (port 3306 by default).
fn upstream_address(url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("mysql://").context("the test server URL is not mysql://")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    anyhow::ensure!(!host_port.is_empty(), "no host in the test server URL");
    Ok(if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:3306") })
}

#[cfg(test)]
mod tests {
    use super::upstream_address;

    #[test]
    fn the_upstream_is_the_host_and_port_of_the_server_url() -> anyhow::Result<()> {
        assert_eq!(upstream_address("mysql://root@127.0.0.1:3306")?, "127.0.0.1:3306");
        assert_eq!(upstream_address("mysql://u:p@w@db:3307/x")?, "db:3307");
        assert_eq!(upstream_address("mysql://localhost")?, "localhost:3306");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_forwards_until_cut_and_again_after_restore() -> anyhow::Result<()> {
    use mysql_async::prelude::Queryable;
    let _timing = crate::support::shared().await;
    let db = TestDb::new().await?;
    let proxy = DbProxy::start().await?;
    let url = proxy.url(&db)?;
    let connect = || async {
        let mut c = mysql_async::Conn::from_url(url.as_str()).await?;
        let one: Option<i64> = c.query_first("SELECT 1").await?;
        c.disconnect().await?;
        Ok::<_, anyhow::Error>(one)
    };
    for i in 0..50 {
        assert_eq!(connect().await.with_context(|| format!("connection {i}"))?, Some(1));
    }
    let mut held = mysql_async::Conn::from_url(url.as_str()).await?;
    proxy.cut();
    assert!(held.query_drop("SELECT 1").await.is_err(), "a connection survived the cut");
    assert!(connect().await.is_err(), "a new connection got through while cut");
    proxy.restore();
    assert_eq!(connect().await?, Some(1));
    assert_eq!(proxy.accepted_total(), 52);
    assert_eq!(proxy.refused_total(), 1);
    drop(held);
    db.drop_db().await
}
