//! The one HTTP server of the project, behind `/metrics` and the dashboard.
//! It owns the listener, the connections and their limits, TLS and basic
//! auth (`--web-config-file`, the format of Prometheus' exporter-toolkit);
//! what a path answers is the caller's [`Pages`].
//!
//! hyper (HTTP/1.1) runs on a current-thread tokio runtime on one named
//! thread per server, started only when an endpoint is asked for. Pages are
//! built on that thread (small files and a metrics encode): nothing goes to
//! tokio's blocking pool, so the process's thread count does not move with
//! load. Whatever clients do, a connection is bounded: its TLS handshake and
//! each request head must arrive within [`HEAD_DEADLINE`], a connection that
//! moves no byte for [`IDLE_TIMEOUT`] is closed, heads are at most
//! [`MAX_HEAD_BYTES`], requests carry no body, the kernel queues up to
//! [`LISTEN_BACKLOG`] connections while they wait to be accepted, and at
//! most [`MAX_CONNECTIONS`] are served at once. At that limit a new connection
//! takes the place of the one that has waited longest for a request head
//! (a flood's held half-requests, an idle keep-alive connection): a flood
//! from one host cannot keep a probe or a scrape out.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
pub use hyper::StatusCode;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use openssl::ssl::{Ssl, SslAcceptor, SslFiletype, SslMethod};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// Longest a client may take for a TLS handshake, and for each request head
/// from the moment the server waits for it.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// A connection that moves no byte either way for this long is closed: a
/// keep-alive client that went quiet, or one that stopped reading.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Most bytes of a request head (hyper's smallest buffer).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Connections the kernel completes and queues before this server accepts
/// them (capped by the kernel's `net.core.somaxconn`, 4096 by default).
/// std's 128 is too few: a flood from one fast client filled it while the
/// server accepted, the kernel then dropped every new SYN, a probe's too,
/// and a dropped SYN is retried only after 1 s.
pub const LISTEN_BACKLOG: u32 = 4096;
/// Connections served at once; one more evicts the one waiting longest for
/// a request head.
pub const MAX_CONNECTIONS: usize = 256;

/// What a path answers: status, content type and body.
pub struct Page {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Page {
    pub fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Page {
            status: StatusCode::OK,
            content_type,
            body: body.into(),
        }
    }

    pub fn not_found() -> Self {
        Page {
            status: StatusCode::NOT_FOUND,
            content_type: TEXT,
            body: b"not found\n".to_vec(),
        }
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

/// The pages a server serves: request path (no query) to page.
pub type Pages = Arc<dyn Fn(&str) -> Page + Send + Sync>;

/// A wrong `--web-config-file`: what and where, in one line.
#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("web config {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("web config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("web config {path}: {what} {file}: {source}")]
    Tls {
        path: PathBuf,
        what: &'static str,
        file: PathBuf,
        source: openssl::error::ErrorStack,
    },
}

/// The file as exporter-toolkit documents it; only the settings below are
/// supported, and any other key is refused rather than silently ignored (a
/// security setting that does nothing is worse than an error).
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WebConfigFile {
    tls_server_config: Option<TlsServerConfig>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsServerConfig {
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// TLS and basic auth for both endpoints, as `--web-config-file` says.
pub struct WebConfig {
    tls: Option<SslAcceptor>,
    /// User to bcrypt hash.
    users: BTreeMap<String, String>,
    /// User to the last password that matched its hash: bcrypt is slow on
    /// purpose, and a scraper sends the same credentials every time.
    verified: Mutex<BTreeMap<String, String>>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl WebConfig {
    /// Reads and checks the file: the YAML, every bcrypt hash, and the
    /// certificate and key (relative paths are from the file's folder, as
    /// exporter-toolkit reads them).
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let invalid = |message: String| WebConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|source| WebConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: WebConfigFile = if text.trim().is_empty() {
            WebConfigFile::default()
        } else {
            serde_norway::from_str::<Option<WebConfigFile>>(&text)
                .map_err(|error| invalid(one_line(&error.to_string())))?
                .unwrap_or_default()
        };
        let users = file.basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            if user.contains(':') {
                return Err(invalid(format!(
                    "basic_auth_users: user {user:?} contains ':', which basic auth cannot carry"
                )));
            }
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(invalid(format!(
                    "basic_auth_users: the password of {user:?} is not a bcrypt hash \
                     (make one with `htpasswd -nBC 10 {user}`)"
                )));
            }
        }
        let folder = path.parent().unwrap_or(Path::new("."));
        let tls = match file.tls_server_config {
            None => None,
            Some(files) => Some(tls_acceptor(
                path,
                &folder.join(&files.cert_file),
                &folder.join(&files.key_file),
            )?),
        };
        Ok(WebConfig {
            tls,
            users,
            verified: Mutex::default(),
        })
    }

    /// Whether the server speaks TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether a request's `Authorization` lets it in.
    fn admits(&self, authorization: Option<&HeaderValue>) -> bool {
        if self.users.is_empty() {
            return true;
        }
        let Some((user, password)) = authorization.and_then(basic_credentials) else {
            return false;
        };
        let Some(hash) = self.users.get(&user) else {
            return false;
        };
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = verified.get(&user) {
            if known.len() == password.len()
                && openssl::memcmp::eq(known.as_bytes(), password.as_bytes())
            {
                return true;
            }
        }
        if bcrypt::verify(&password, hash).unwrap_or(false) {
            verified.insert(user, password);
            true
        } else {
            false
        }
    }
}

/// The first line of a parser's message, which may quote the file.
fn one_line(message: &str) -> String {
    message.lines().next().unwrap_or_default().to_string()
}

fn tls_acceptor(path: &Path, cert: &Path, key: &Path) -> Result<SslAcceptor, WebConfigError> {
    let error = |what: &'static str, file: &Path| {
        let (path, file) = (path.to_path_buf(), file.to_path_buf());
        move |source| WebConfigError::Tls {
            path,
            what,
            file,
            source,
        }
    };
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .map_err(error("TLS set-up for", cert))?;
    builder
        .set_certificate_chain_file(cert)
        .map_err(error("cert_file", cert))?;
    builder
        .set_private_key_file(key, SslFiletype::PEM)
        .map_err(error("key_file", key))?;
    builder
        .check_private_key()
        .map_err(error("key_file does not match cert_file:", key))?;
    Ok(builder.build())
}

/// `Basic base64(user:password)` as user and password.
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let encoded = value.to_str().ok()?.strip_prefix("Basic ")?.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// A running server; dropping it stops it and joins its thread.
pub struct WebServer {
    address: SocketAddr,
    tls: bool,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl WebServer {
    /// Binds `listen` at once (so a bad address fails before anything else
    /// starts) and serves `pages` on a thread named `name`.
    pub fn start(
        name: &str,
        listen: &str,
        web: Option<Arc<WebConfig>>,
        pages: Pages,
    ) -> anyhow::Result<Self> {
        let tls = web.as_ref().is_some_and(|web| web.tls());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .context("starting the HTTP runtime")?;
        // The caller says what the address was for.
        let listener = {
            let _in_runtime = runtime.enter();
            bind(listen)?
        };
        let address = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let thread = crate::shutdown::spawn(name, move || {
            runtime.block_on(accept_loop(listener, web, pages, stopped));
        })
        .with_context(|| format!("starting thread {name}"))?;
        Ok(WebServer {
            address,
            tls,
            stop,
            thread: Some(thread),
        })
    }

    /// The address bound (the port the OS chose, for `:0`).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://ADDRESS` or `https://ADDRESS`, as a client reaches it.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.address)
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Binds `listen` (the first of its addresses that binds) with a listen
/// backlog of [`LISTEN_BACKLOG`].
fn bind(listen: &str) -> io::Result<tokio::net::TcpListener> {
    let mut last_error = None;
    for address in listen.to_socket_addrs()? {
        let socket = if address.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As std's bind does: a restart binds while old connections linger.
        socket.set_reuseaddr(true)?;
        match socket.bind(address) {
            Ok(()) => return socket.listen(LISTEN_BACKLOG),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "the address names no host")
    }))
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    web: Option<Arc<WebConfig>>,
    pages: Pages,
    mut stopped: watch::Receiver<bool>,
) {
    let origin = Instant::now();
    // Connections are tasks of this set: leaving the loop drops them all.
    let mut connections = tokio::task::JoinSet::new();
    // The live ones (not aborted), each with when it last began to wait
    // for a request head.
    let mut live: HashMap<tokio::task::Id, (AbortHandle, HeadClock)> = HashMap::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.changed() => break,
            Some(ended) = connections.join_next_with_id(), if !connections.is_empty() => {
                let id = match ended {
                    Ok((id, ())) => id,
                    Err(error) => error.id(),
                };
                live.remove(&id);
                continue;
            }
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, typically: wait rather than spin.
                log::debug!("HTTP accept: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if live.len() >= MAX_CONNECTIONS {
            evict_longest_waiting(&mut live);
        }
        if connections.len() >= 2 * MAX_CONNECTIONS {
            // Evicted connections not yet dropped by the runtime: a bound
            // on them too.
            drop(stream);
            continue;
        }
        let clock = HeadClock::new(origin);
        let (web, pages, task_clock) = (web.clone(), pages.clone(), clock.clone());
        let abort = connections.spawn(async move {
            connection(stream, web, pages, task_clock).await;
        });
        live.insert(abort.id(), (abort, clock));
        // Each accepted connection is polled once (a request that came
        // with the connection is answered) before the next is accepted:
        // with a full backlog, accepting on and on would evict it unread.
        tokio::task::yield_now().await;
    }
}

/// At capacity: closes the connection that has waited longest for a
/// complete request head (a flood's held half-requests, an idle keep-alive
/// connection), so a newcomer (a probe, a scrape) is served.
fn evict_longest_waiting(live: &mut HashMap<tokio::task::Id, (AbortHandle, HeadClock)>) {
    let longest = live
        .iter()
        .map(|(id, (_, clock))| (clock.waiting_since(), *id))
        .min();
    let Some((_, id)) = longest else {
        return;
    };
    if let Some((abort, _)) = live.remove(&id) {
        abort.abort();
    }
}

/// When a connection began to wait for its next request head: its accept,
/// or its last request (answered at once: pages are built in memory), in
/// ms since the server's start.
#[derive(Clone)]
struct HeadClock {
    origin: Instant,
    since_ms: Arc<AtomicU64>,
}

impl HeadClock {
    fn new(origin: Instant) -> Self {
        let clock = HeadClock {
            origin,
            since_ms: Arc::new(AtomicU64::new(0)),
        };
        clock.waiting();
        clock
    }

    fn waiting(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.since_ms.store(ms, Ordering::Relaxed);
    }

    fn waiting_since(&self) -> u64 {
        self.since_ms.load(Ordering::Relaxed)
    }
}

/// One accepted connection: its TLS handshake if configured, then HTTP.
async fn connection(
    stream: tokio::net::TcpStream,
    web: Option<Arc<WebConfig>>,
    pages: Pages,
    clock: HeadClock,
) {
    let _ = stream.set_nodelay(true);
    let activity = Activity::new();
    let stream = Watched::new(stream, &activity);
    let Some(acceptor) = web.as_ref().and_then(|web| web.tls.as_ref()) else {
        return serve_connection(stream, &activity, web, pages, clock).await;
    };
    let tls_stream =
        Ssl::new(acceptor.context()).and_then(|ssl| tokio_openssl::SslStream::new(ssl, stream));
    let Ok(mut tls_stream) = tls_stream else {
        return;
    };
    let handshake = Pin::new(&mut tls_stream).accept();
    match tokio::time::timeout(HEAD_DEADLINE, handshake).await {
        Ok(Ok(())) => serve_connection(tls_stream, &activity, web, pages, clock).await,
        Ok(Err(error)) => log::debug!("TLS handshake: {error}"),
        Err(_) => log::debug!("TLS handshake: no handshake within the deadline"),
    }
}

async fn serve_connection<S>(
    stream: S,
    activity: &Activity,
    web: Option<Arc<WebConfig>>,
    pages: Pages,
    clock: HeadClock,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let response = respond(&request, web.as_deref(), &pages);
        // Answered: from here the connection waits for its next head.
        clock.waiting();
        std::future::ready(Ok::<_, std::convert::Infallible>(response))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_DEADLINE)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    loop {
        let quiet_until = activity.last() + IDLE_TIMEOUT;
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    log::debug!("HTTP connection: {error}");
                }
                return;
            }
            _ = tokio::time::sleep_until(quiet_until.into()) => {
                if activity.last().elapsed() >= IDLE_TIMEOUT {
                    return; // dropping the connection closes it
                }
            }
        }
    }
}

/// One request's answer: method, body and credentials checked, then the page.
fn respond(
    request: &Request<Incoming>,
    web: Option<&WebConfig>,
    pages: &Pages,
) -> Response<Full<Bytes>> {
    if let Some(web) = web {
        if !web.admits(request.headers().get(header::AUTHORIZATION)) {
            let mut response = plain(StatusCode::UNAUTHORIZED, "unauthorized\n");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"weatherstream\", charset=\"UTF-8\""),
            );
            return response;
        }
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let has_body = request.headers().contains_key(header::TRANSFER_ENCODING)
        || request
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0");
    if has_body {
        // hyper closes the connection rather than read a body nobody asked for.
        return plain(StatusCode::PAYLOAD_TOO_LARGE, "requests carry no body\n");
    }
    let page = pages(request.uri().path());
    let mut response = Response::new(Full::new(Bytes::from(page.body)));
    *response.status_mut() = page.status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(page.content_type),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT));
    response
}

/// When a connection last moved a byte, shared by its stream and its task.
#[derive(Clone)]
struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A stream that records each read or write that moved bytes.
struct Watched<S> {
    inner: S,
    activity: Activity,
}

impl<S> Watched<S> {
    fn new(inner: S, activity: &Activity) -> Self {
        Watched {
            inner,
            activity: activity.clone(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, text: &str) -> Result<WebConfig, WebConfigError> {
        let path = dir.join("web.yml");
        std::fs::write(&path, text).unwrap();
        WebConfig::load(&path)
    }

    #[test]
    fn a_web_config_is_checked_whole_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let hash = bcrypt::hash("secret", 4).unwrap();
        let web = config(dir.path(), &format!("basic_auth_users:\n  alice: {hash}\n")).unwrap();
        assert!(!web.tls());
        let header = |text: &str| {
            HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(text)
            ))
            .unwrap()
        };
        assert!(web.admits(Some(&header("alice:secret"))));
        assert!(web.admits(Some(&header("alice:secret"))), "cached");
        assert!(!web.admits(Some(&header("alice:secreT"))));
        assert!(!web.admits(Some(&header("bob:secret"))));
        assert!(!web.admits(None));
        assert!(!web.admits(Some(&HeaderValue::from_static("Bearer x"))));

        assert!(config(dir.path(), "").unwrap().admits(None));
        for (text, expected) in [
            ("basic_auth_users:\n  alice: plain\n", "not a bcrypt hash"),
            ("basic_auth_user:\n  alice: x\n", "unknown field"),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: c\n",
                "unknown field",
            ),
            (
                "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
                "cert_file",
            ),
            ("basic_auth_users: [", "web config"),
        ] {
            let error = config(dir.path(), text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(error.contains("web.yml"), "{error}");
            assert!(!error.contains('\n'), "one line: {error}");
        }
        let error = WebConfig::load(&dir.path().join("none.yml")).unwrap_err();
        assert!(error.to_string().contains("none.yml"), "{error}");
    }
}
