//! The `/metrics` endpoint: a small blocking HTTP server (tiny_http) on its own thread that
//! answers `GET /metrics` and nothing else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

/// The running endpoint; dropping it stops the thread.
struct MetricsServer {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MetricsServer({})", self.addr)
    }
}

impl MetricsServer {
    /// Where it listens (the port it got, when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves [`super::global`] at `http://ADDR/metrics`.
///
/// # Errors
/// Serves `/metrics` beside `server` when `addr` is given: the endpoint stops with the
/// server, and `source` (given the server's load) adds its live figures at each scrape.
/// Returns the bound address, which the caller announces after its "listening on" line
/// (that line comes once nothing more can fail at start).
///
/// # Errors
/// The address cannot be bound, or the thread cannot start.
pub fn serve_beside(
    server: &mut crate::net::server::Server,
    addr: Option<SocketAddr>,
    source: impl FnOnce(crate::net::server::Load) -> super::Source,
) -> Result<Option<SocketAddr>, String> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let endpoint = serve(addr)?;
    let at = endpoint.local_addr();
    super::global().add_source(source(server.load()));
    server.attach(Box::new(endpoint));
    Ok(Some(at))
}

/// The address cannot be bound, or the thread cannot start.
fn serve(addr: SocketAddr) -> Result<MetricsServer, String> {
    let server = Arc::new(
        tiny_http::Server::http(addr)
            .map_err(|e| format!("metrics: cannot listen on {addr}: {e}"))?,
    );
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| format!("metrics: {addr} is not an IP address"))?;
    let worker = Arc::clone(&server);
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in worker.incoming_requests() {
                answer(request);
            }
        })
        .map_err(|e| format!("metrics: cannot start its thread: {e}"))?;
    Ok(MetricsServer {
        server,
        addr: bound,
        thread: Some(thread),
    })
}

fn answer(request: tiny_http::Request) {
    use tiny_http::{Header, Method, Response};
    let path = request.url().split('?').next().unwrap_or("");
    let response = match (request.method(), path) {
        (Method::Get, "/metrics") => {
            let body = super::global().render();
            let kind = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
            let mut r = Response::from_string(body);
            // A fixed, valid header: cannot fail to parse.
            if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], kind.as_bytes()) {
                r.add_header(h);
            }
            r
        }
        (Method::Get, _) => {
            Response::from_string("not found: try /metrics\n").with_status_code(404)
        }
        _ => Response::from_string("only GET /metrics\n").with_status_code(405),
    };
    if let Err(e) = request.respond(response) {
        log::debug!("metrics: answer not sent: {e}");
    }
}
