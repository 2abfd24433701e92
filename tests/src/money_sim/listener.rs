//! The TCP listener behind axum, extended so a handler can close its own connection without
//! answering (the `reset` outage): each accepted socket keeps a duplicate descriptor, reachable
//! from handlers through `ConnectInfo<ConnHandle>`, on which the handler calls
//! `shutdown(Both)`. The client sees the connection closed before any response byte.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};

/// Pause after an accept error that is not about one connection (e.g. out of descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub(crate) struct SimListener {
    inner: TcpListener,
}

impl SimListener {
    pub(crate) fn new(inner: TcpListener) -> Self {
        SimListener { inner }
    }
}

/// Per-connection information for handlers.
#[derive(Debug, Clone)]
pub(crate) struct ConnHandle {
    /// The duplicate descriptor; `None` if it could not be made (or for the listener's own
    /// address).
    closer: Option<Arc<std::net::TcpStream>>,
}

impl ConnHandle {
    /// Whether [`ConnHandle::drop_connection`] can close this connection.
    pub(crate) fn can_drop(&self) -> bool {
        self.closer.is_some()
    }

    /// Closes the connection in both directions without an answer. An error means the socket
    /// is already unusable, which is the goal anyway.
    pub(crate) fn drop_connection(&self) {
        let Some(socket) = &self.closer else {
            return;
        };
        if let Err(error) = socket.shutdown(Shutdown::Both) {
            tracing::debug!(%error, "money-sim could not shut down a connection");
        }
    }
}

impl Listener for SimListener {
    type Io = TcpStream;
    type Addr = ConnHandle;

    async fn accept(&mut self) -> (TcpStream, ConnHandle) {
        loop {
            match self.inner.accept().await {
                Ok((stream, _remote)) => {
                    // Small JSON answers must not wait for Nagle's algorithm.
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%error, "money-sim could not set TCP_NODELAY");
                    }
                    let closer = duplicate(&stream).map(Arc::new);
                    return (stream, ConnHandle { closer });
                }
                Err(error) if is_per_connection(&error) => {}
                Err(error) => {
                    tracing::warn!(%error, "money-sim accept failed; pausing before retrying");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<ConnHandle> {
        // Only called for diagnostics; the listener itself has no connection to close.
        self.inner.local_addr().map(|_: SocketAddr| ConnHandle { closer: None })
    }
}

impl Connected<IncomingStream<'_, SimListener>> for ConnHandle {
    fn connect_info(stream: IncomingStream<'_, SimListener>) -> Self {
        stream.remote_addr().clone()
    }
}

#[cfg(unix)]
fn duplicate(stream: &TcpStream) -> Option<std::net::TcpStream> {
    use std::os::fd::AsFd as _;
    match stream.as_fd().try_clone_to_owned() {
        Ok(fd) => Some(std::net::TcpStream::from(fd)),
        Err(error) => {
            tracing::debug!(%error, "money-sim could not duplicate a socket; reset outages will hang instead");
            None
        }
    }
}

#[cfg(not(unix))]
fn duplicate(_stream: &TcpStream) -> Option<std::net::TcpStream> {
    None
}

fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
