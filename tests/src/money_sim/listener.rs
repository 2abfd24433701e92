//! The TCP listener behind axum, extended in two ways:
//!
//! * A handler can close its own connection without answering (the `reset` outage): each
//!   accepted socket keeps a duplicate descriptor, reachable from handlers through
//!   `ConnectInfo<ConnHandle>`, on which the handler calls `shutdown(Both)`. The client sees the
//!   connection closed before any response byte.
//! * A handler knows when its request reached the host: every read asks the kernel for the
//!   receive time of the bytes it returns (`SO_TIMESTAMPNS`), and [`ConnHandle::take_received`]
//!   gives the latest. Money runs on hosts of its own; money-sim shares two cores with payoutd
//!   and MariaDB, and a packet capture showed its handlers reading requests up to 30 ms after
//!   they had arrived (opening hundreds of connections at a start, or simply not scheduled),
//!   while the requests on the wire never exceeded the limit in any second. The rate limit and
//!   the arrival log count the kernel's time, as a host that is never starved would.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use std::io::Write as _;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Pause after an accept error that is not about one connection (e.g. out of descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub(crate) struct SimListener {
    inner: TcpListener,
    connections: Arc<Connections>,
}

impl SimListener {
    pub(crate) fn new(inner: TcpListener, connections: Arc<Connections>) -> Self {
        // Accepted sockets inherit the option; asking on the listener also makes the kernel
        // turn receive times on (which it does in the background) before the first request.
        enable_receive_times(&inner);
        SimListener { inner, connections }
    }
}

/// Counts of the connections clients opened: how many, and how many are open now and at most
/// (a client's connection pool is seen from here; see the ledger).
#[derive(Debug, Default)]
pub(crate) struct Connections {
    accepted: AtomicU64,
    open: AtomicU64,
    peak_open: AtomicU64,
}

impl Connections {
    /// Counts one more open connection until the returned guard is dropped.
    fn opened(self: &Arc<Self>) -> OpenConnection {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_open.fetch_max(open, Ordering::Relaxed);
        OpenConnection(Arc::clone(self))
    }

    pub(crate) fn accepted_total(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub(crate) fn open_now(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    pub(crate) fn peak_open(&self) -> u64 {
        self.peak_open.load(Ordering::Relaxed)
    }

    /// Starts counting afresh: nothing accepted yet, the peak being what is open now.
    pub(crate) fn reset(&self) {
        self.accepted.store(0, Ordering::Relaxed);
        self.peak_open.store(self.open.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// One open connection in [`Connections`]; dropped with its stream.
#[derive(Debug)]
struct OpenConnection(Arc<Connections>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-connection information for handlers.
#[derive(Debug, Clone)]
pub(crate) struct ConnHandle {
    /// The duplicate descriptor; `None` if it could not be made (or for the listener's own
    /// address).
    closer: Option<Arc<std::net::TcpStream>>,
    /// Kernel receive time of the bytes of the latest read, in ns since the Unix epoch; 0 until
    /// a read carried one.
    received: Arc<AtomicU64>,
}

impl ConnHandle {
    /// Whether [`ConnHandle::drop_connection`] can close this connection.
    pub(crate) fn can_drop(&self) -> bool {
        self.closer.is_some()
    }

    /// When the kernel received the bytes of this connection's latest read, on the wall clock,
    /// and forgets it, so a later request never gets an earlier request's time. HTTP/1.1 sends
    /// one request at a time on a connection, so when a handler starts, that is when its
    /// request arrived. `None` when the kernel gave no time.
    pub(crate) fn take_received(&self) -> Option<SystemTime> {
        unix_nanos(self.received.swap(0, Ordering::Relaxed))
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
    type Io = StampedStream;
    type Addr = ConnHandle;

    async fn accept(&mut self) -> (StampedStream, ConnHandle) {
        loop {
            match self.inner.accept().await {
                Ok((stream, _remote)) => {
                    // Small JSON answers must not wait for Nagle's algorithm.
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%error, "money-sim could not set TCP_NODELAY");
                    }
                    let closer = duplicate(&stream).map(Arc::new);
                    match StampedStream::new(stream) {
                        Ok(mut stream) => {
                            stream.open = Some(self.connections.opened());
                            let received = stream.received.clone();
                            return (stream, ConnHandle { closer, received });
                        }
                        // The connection is closed (dropped); the client sees that and retries.
                        Err(error) => {
                            tracing::warn!(%error, "money-sim could not register a connection");
                        }
                    }
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
        self.inner
            .local_addr()
            .map(|_: SocketAddr| ConnHandle { closer: None, received: Arc::default() })
    }
}

impl Connected<IncomingStream<'_, SimListener>> for ConnHandle {
    fn connect_info(stream: IncomingStream<'_, SimListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// The most a stamped read asks the kernel for (see [`StampedStream`]'s `poll_read`).
const READ_WINDOW: usize = 2048;

/// A TCP stream whose reads note the kernel's receive time of the bytes they return.
#[derive(Debug)]
pub(crate) struct StampedStream {
    io: StreamIo,
    /// See [`ConnHandle::take_received`]; shared with the connection's handle.
    received: Arc<AtomicU64>,
    /// Counts the stream in [`Connections`] while it lives (set by the listener).
    open: Option<OpenConnection>,
}

#[derive(Debug)]
enum StreamIo {
    /// The kernel was asked for receive times: reads are `recvmsg` calls on the registered
    /// socket, which also keep tokio's rule of not reading again after a short read until the
    /// socket reports new bytes (hyper polls for reads while a request is being answered, and
    /// without that rule each of those polls is a `recvmsg` that finds nothing).
    Stamped(AsyncFd<std::net::TcpStream>),
    /// Plain reads (the kernel refused receive times, or the socket could not be registered).
    Plain(TcpStream),
}

impl StampedStream {
    /// Fails only if the socket cannot be moved from tokio's registration to its own.
    pub(crate) fn new(inner: TcpStream) -> io::Result<Self> {
        let io = if enable_receive_times(&inner) {
            StreamIo::Stamped(register(inner.into_std()?)?)
        } else {
            StreamIo::Plain(inner)
        };
        Ok(StampedStream { io, received: Arc::default(), open: None })
    }

    /// Kernel receive time of the latest read's bytes (see [`ConnHandle::take_received`]).
    #[cfg(test)]
    pub(crate) fn received(&self) -> Option<SystemTime> {
        unix_nanos(self.received.load(Ordering::Relaxed))
    }

    #[cfg(test)]
    fn stamping(&self) -> bool {
        matches!(self.io, StreamIo::Stamped(_))
    }
}
/// Registers a socket with tokio for readiness alone. `AsyncFd::new` is deprecated because a
/// type could close its descriptor while registered (tokio/tokio#8587) and its replacement is
/// `unsafe`, which this workspace forbids; a `std::net::TcpStream` keeps its descriptor open
/// until it is dropped, and the `AsyncFd` owns it, so the descriptor outlives the registration.
#[allow(deprecated)]
fn register(socket: std::net::TcpStream) -> io::Result<AsyncFd<std::net::TcpStream>> {
    AsyncFd::new(socket)
}

/// A time stored as ns since the Unix epoch, 0 standing for none.
fn unix_nanos(ns: u64) -> Option<SystemTime> {
    (ns > 0).then(|| UNIX_EPOCH + Duration::from_nanos(ns))
}

impl AsyncRead for StampedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let fd = match &mut this.io {
            StreamIo::Plain(stream) => return Pin::new(stream).poll_read(cx, buf),
            StreamIo::Stamped(fd) => fd,
        };
        loop {
            let mut ready = ready!(fd.poll_read_ready(cx))?;
            // The caller's buffer is uninitialised and large (hyper's starts at 8 KiB), and a
            // safe read must zero what it offers the kernel: offer at most READ_WINDOW bytes,
            // enough for a grant request in one read, so a read does not zero 8 KiB or more.
            let window = buf.remaining().min(READ_WINDOW);
            let unfilled = buf.initialize_unfilled_to(window);
            match ready.try_io(|fd| read_stamped(fd.get_ref(), unfilled)) {
                Ok(Ok((n, at))) => {
                    // A TCP read that returns less than it was offered emptied the socket
                    // (tokio's own rule for its streams): wait for the next bytes.
                    if n > 0 && n < window {
                        ready.clear_ready();
                    }
                    if let Some(ns) = at {
                        this.received.store(ns, Ordering::Relaxed);
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Would block: readiness was cleared; wait for it again.
                Err(_) => {}
            }
        }
    }
}

/// One write on the registered socket, once it is writable.
fn poll_write_with(
    fd: &AsyncFd<std::net::TcpStream>,
    cx: &mut Context<'_>,
    len: usize,
    mut write: impl FnMut(&std::net::TcpStream) -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        let mut ready = ready!(fd.poll_write_ready(cx))?;
        match ready.try_io(|fd| write(fd.get_ref())) {
            Ok(Ok(n)) => {
                // A short write filled the socket's buffer (tokio's rule again).
                if n > 0 && n < len {
                    ready.clear_ready();
                }
                return Poll::Ready(Ok(n));
            }
            Ok(Err(e)) => return Poll::Ready(Err(e)),
            Err(_) => {}
        }
    }
}

impl AsyncWrite for StampedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            StreamIo::Plain(stream) => Pin::new(stream).poll_write(cx, data),
            StreamIo::Stamped(fd) => poll_write_with(fd, cx, data.len(), |mut s| s.write(data)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            StreamIo::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            StreamIo::Stamped(fd) => {
                let len = bufs.iter().map(|b| b.len()).sum();
                poll_write_with(fd, cx, len, |mut s| s.write_vectored(bufs))
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            StreamIo::Plain(stream) => Pin::new(stream).poll_flush(cx),
            // Writes go straight to the socket.
            StreamIo::Stamped(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            StreamIo::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            StreamIo::Stamped(fd) => Poll::Ready(fd.get_ref().shutdown(Shutdown::Write)),
        }
    }
}

/// Asks the kernel to attach a receive time to what reads return; false where it cannot.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn enable_receive_times(socket: &impl std::os::fd::AsFd) -> bool {
    use nix::sys::socket::{setsockopt, sockopt::ReceiveTimestampns};
    match setsockopt(socket, ReceiveTimestampns, &true) {
        Ok(()) => true,
        Err(error) => {
            tracing::debug!(%error, "money-sim could not ask for receive times; arrivals are stamped when read");
            false
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn enable_receive_times<S>(_socket: &S) -> bool {
    false
}

/// One non-blocking `recvmsg`: the bytes read and the kernel's receive time of the last of
/// them (ns since the Unix epoch), if it gave one.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn read_stamped(stream: &std::net::TcpStream, into: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    use std::io::IoSliceMut;
    use std::os::fd::AsRawFd as _;

    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

    let mut control = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let mut iov = [IoSliceMut::new(into)];
    let msg =
        recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut control), MsgFlags::MSG_DONTWAIT)
            .map_err(io::Error::from)?;
    let mut at = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmTimestampns(ts) = cmsg {
                let ns = i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec());
                at = u64::try_from(ns).ok().filter(|&ns| ns > 0);
            }
        }
    }
    Ok((msg.bytes, at))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn read_stamped(
    _stream: &std::net::TcpStream,
    _into: &mut [u8],
) -> io::Result<(usize, Option<u64>)> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A client connected to a server side that stamps its reads.
    async fn connected_pair() -> io::Result<(TcpStream, StampedStream)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let client = TcpStream::connect(listener.local_addr()?).await?;
        let (server, _) = listener.accept().await?;
        let server = StampedStream::new(server)?;
        assert!(server.stamping(), "SO_TIMESTAMPNS refused");
        Ok((client, server))
    }

    #[tokio::test]
    async fn a_read_notes_when_the_kernel_received_the_bytes_not_when_they_were_read() {
        let (mut client, mut server) = connected_pair().await.unwrap();
        assert!(server.received().is_none());
        // The kernel turns receive times on for the whole stack in the background.
        tokio::time::sleep(Duration::from_millis(100)).await;

        let sent = SystemTime::now();
        client.write_all(b"POST /grants HTTP/1.1\r\n").await.unwrap();
        // The bytes wait in the socket while the reader is busy elsewhere.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut buf = [0u8; 64];
        let n = server.read(&mut buf).await.unwrap();
        let read_at = SystemTime::now();
        assert_eq!(&buf[..n], b"POST /grants HTTP/1.1\r\n");

        let received = server.received().expect("the kernel gives receive times on Linux");
        let after_send = received.duration_since(sent).unwrap_or_default();
        let before_read = read_at.duration_since(received).unwrap();
        assert!(after_send < Duration::from_millis(50), "received {after_send:?} after the send");
        assert!(
            before_read >= Duration::from_millis(150),
            "received only {before_read:?} before the read"
        );
    }

    #[tokio::test]
    async fn a_request_sent_before_its_connection_was_accepted_gets_its_receive_time_too() {
        let listener =
            SimListener::new(TcpListener::bind("127.0.0.1:0").await.unwrap(), Arc::default());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut client = TcpStream::connect(listener.inner.local_addr().unwrap()).await.unwrap();
        let sent = SystemTime::now();
        client.write_all(b"POST /grants HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (server, _) = listener.inner.accept().await.unwrap();
        let mut server = StampedStream::new(server).unwrap();
        let mut buf = [0u8; 64];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"POST /grants HTTP/1.1\r\n");
        let received =
            server.received().expect("a receive time for bytes queued before the accept");
        let after_send = received.duration_since(sent).unwrap_or_default();
        assert!(after_send < Duration::from_millis(50), "received {after_send:?} after the send");
    }

    #[tokio::test]
    async fn after_a_read_that_emptied_the_socket_the_next_read_waits_for_new_bytes() {
        let (mut client, mut server) = connected_pair().await.unwrap();

        client.write_all(b"first").await.unwrap();
        let mut buf = [0u8; 64];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"first");
        // The socket is empty: the read must wait, not spin and not end.
        let waited = tokio::time::timeout(Duration::from_millis(100), server.read(&mut buf)).await;
        assert!(waited.is_err(), "a read of an empty socket returned {waited:?}");
        // Bytes sent while nobody reads still wake the next read.
        client.write_all(b"second").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
            .await
            .expect("the read was not woken by new bytes")
            .unwrap();
        assert_eq!(&buf[..n], b"second");

        // More than one read window: every byte arrives, in order.
        let big: Vec<u8> = (0..3 * READ_WINDOW + 17).map(|i| (i % 251) as u8).collect();
        client.write_all(&big).await.unwrap();
        let mut got = vec![0u8; big.len()];
        tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut got))
            .await
            .expect("a large request was not read in full")
            .unwrap();
        assert_eq!(got, big);

        // Writes and the end of the stream go through the registered socket.
        server.write_all(b"answer").await.unwrap();
        server.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer");
        drop(client);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0, "the client's close is the end");
    }
}
