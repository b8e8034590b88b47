//! The control thread's HTTP server: hyper's HTTP/1.1 on tokio's sockets, for the metrics
//! port (and the admin socket).
//!
//! Control-plane connections must never take what the data path and the health checks need:
//! each server holds at most [`MAX_CONNECTIONS`] at once (more wait in the listen backlog,
//! holding no descriptor of ringlb's), a client has [`HEADER_TIMEOUT`] to send each request
//! head (also between keep-alive requests) and [`CONNECTION_TIMEOUT`] in all, and a request
//! body is read up to [`MAX_BODY`]. While every slot is taken, each response closes its
//! connection (`Connection: close`), so clients that keep connections alive cannot keep a
//! waiting one out: its turn comes at the next response (nginx closes kept-alive connections
//! when it runs short of them too). tokio's sockets are closed as soon as they are dropped;
//! tokio-uring's are not while a read is in flight, which is why they are not used here.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

/// Connections one server holds at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send a request head, and to send the next one on a kept-alive
/// connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may stay open in all.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request body read.
pub const MAX_BODY: usize = 64 * 1024;
/// Time a client has to send its whole body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// A response with a whole body.
pub type Reply = Response<Full<Bytes>>;

/// A request, its body read.
pub struct Req {
    pub method: hyper::Method,
    pub path: String,
    pub query: Option<String>,
    pub body: Bytes,
}

/// A reply with `status`, a content type and a body.
pub fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Something that accepts connections: a TCP or unix listener.
pub trait Accept {
    type Stream: AsyncRead + AsyncWrite + Unpin + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Stream>>;
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Stream> {
        tokio::net::TcpListener::accept(self).await.map(|(stream, _)| stream)
    }
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Stream> {
        tokio::net::UnixListener::accept(self).await.map(|(stream, _)| stream)
    }
}

/// Serves `listener` until the task is dropped; `handle` answers each request. Must run on
/// the control thread's runtime (connections are local tasks).
pub async fn serve<L, H, F>(listener: L, name: &'static str, handle: H)
where
    L: Accept,
    H: Fn(Req) -> F + Clone + 'static,
    F: Future<Output = Reply> + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Connections being served (the accept loop holds a slot while it waits, so the free
    // slots alone do not say whether the server is full).
    let open = Rc::new(Cell::new(0usize));
    let mut errors = 0u64;
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
        match listener.accept().await {
            Ok(stream) => {
                let handle = handle.clone();
                let open = Rc::clone(&open);
                open.set(open.get() + 1);
                tokio::task::spawn_local(async move {
                    serve_connection(stream, handle, Rc::clone(&open)).await;
                    open.set(open.get() - 1);
                    drop(permit);
                });
            }
            Err(e) => {
                errors += 1;
                // Logged once per 100 in a row, so a descriptor shortage does not flood the log.
                if errors % 100 == 1 {
                    warn!("{name}: accept failed: {e} ({errors} so far)");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one connection; `open` counts the server's connections, this one included.
async fn serve_connection<S, H, F>(stream: S, handle: H, open: Rc<Cell<usize>>)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
    H: Fn(Req) -> F + Clone + 'static,
    F: Future<Output = Reply> + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(16 * 1024)
        // A client that sends its request and shuts its side (`printf ... | nc -U`) gets its
        // answer.
        .half_close(true);
    let service = service_fn(move |request: Request<Incoming>| {
        let handle = handle.clone();
        let open = Rc::clone(&open);
        async move {
            let mut reply = answer(request, handle).await;
            if open.get() >= MAX_CONNECTIONS {
                reply.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(reply)
        }
    });
    let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                debug!("http connection: {e}");
            }
            return;
        }
        () = tokio::time::sleep(CONNECTION_TIMEOUT) => connection.as_mut().graceful_shutdown(),
    }
    // A response in progress may finish; then the socket is dropped, which closes it.
    let _ = tokio::time::timeout(Duration::from_secs(2), connection).await;
}

async fn answer<H, F>(request: Request<Incoming>, handle: H) -> Reply
where
    H: Fn(Req) -> F,
    F: Future<Output = Reply>,
{
    const TOO_LARGE: &str = "{\"error\":\"the request body is larger than 64 KiB\"}\n";
    if request.body().size_hint().lower() > MAX_BODY as u64 {
        return reply(StatusCode::PAYLOAD_TOO_LARGE, "application/json", TOO_LARGE);
    }
    let (parts, body) = request.into_parts();
    let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Err(_) => {
            return reply(
                StatusCode::REQUEST_TIMEOUT,
                "application/json",
                "{\"error\":\"the body came too slowly\"}\n",
            );
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return reply(StatusCode::PAYLOAD_TOO_LARGE, "application/json", TOO_LARGE);
        }
        Ok(Err(_)) => {
            return reply(StatusCode::BAD_REQUEST, "application/json", "{\"error\":\"the body could not be read\"}\n");
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    handle(Req {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        body,
    })
    .await
}
