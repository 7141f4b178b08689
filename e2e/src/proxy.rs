//! A fault-injecting TCP proxy between devices and a server.
//!
//! [`Proxy::start`] listens on a free loopback port and forwards every accepted connection to the
//! upstream address. Each new connection takes the next [`Fault`] from a shared, changeable plan
//! (a queue, then a default), so a test decides exactly which connection breaks and how:
//! deterministic, no randomness, no timing guesses. The proxy works on bytes, not on HTTP: a
//! fault applies to a whole TCP connection (HTTP clients keep connections alive, so open a new
//! client — a new connection pool — when the next *request* must meet the next fault).
//!
//! The upstream can be changed while running ([`Proxy::set_upstream`]), which gives devices a
//! stable URL across server restarts. The proxy (its listener and every connection) stops when
//! the [`Proxy`] is dropped.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What happens to one proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward both directions untouched.
    Pass,
    /// Forward the first `n` bytes the client sends, then close both sides: the request never
    /// fully reaches the server.
    CutRequestAfter(usize),
    /// Forward the request, then only the first `n` bytes of the answer, then close both sides.
    CutResponseAfter(usize),
    /// Forward the request; when the server starts answering (so it has processed the request),
    /// close both sides without forwarding a byte of the answer.
    DropResponse,
    /// Wait this long before connecting upstream, then pass through.
    Delay(Duration),
    /// Close the client's connection at once, never connecting upstream.
    Refuse,
}

/// Counters, for assertions and summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: u64,
    /// Faults that took effect (a cut counts only once its byte limit was reached).
    pub faults: u64,
}

struct Plan {
    queue: VecDeque<Fault>,
    default: Fault,
}

struct Shared {
    upstream: Mutex<SocketAddr>,
    plan: Mutex<Plan>,
    connections: AtomicU64,
    faults: AtomicU64,
    requests: Stream,
    responses: Stream,
}

/// One direction (devices → server, or back) over all connections: bytes forwarded so far, and
/// the positions in that count where a connection is to be cut, ascending.
#[derive(Default)]
struct Stream {
    bytes: AtomicU64,
    cuts: Mutex<VecDeque<u64>>,
}

impl Stream {
    /// How many of `n` bytes may be forwarded before the next cut position (`n` if none is
    /// near), counted as forwarded; a cut position that is reached is used up. Counted before
    /// the caller writes, so a reader that has seen the bytes also sees the count.
    fn take(&self, n: usize) -> usize {
        let mut cuts = lock(&self.cuts);
        let mut allowed = n;
        if let Some(&at) = cuts.front() {
            let left = at.saturating_sub(self.bytes.load(Ordering::SeqCst));
            if left < n as u64 {
                cuts.pop_front();
                allowed = left as usize;
            }
        }
        self.bytes.fetch_add(allowed as u64, Ordering::SeqCst);
        allowed
    }

    fn cut_at(&self, positions: impl IntoIterator<Item = u64>) {
        let mut cuts = lock(&self.cuts);
        cuts.extend(positions);
        cuts.make_contiguous().sort_unstable();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running proxy. Stops (listener and all connections) when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on `127.0.0.1:0` forwarding to `upstream`, passing everything through.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            plan: Mutex::new(Plan { queue: VecDeque::new(), default: Fault::Pass }),
            connections: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            requests: Stream::default(),
            responses: Stream::default(),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Proxy { addr, shared, task })
    }

    /// Starts a proxy in front of a server base URL such as `http://127.0.0.1:41234`.
    pub async fn in_front_of(url: &str) -> std::io::Result<Proxy> {
        Proxy::start(addr_of(url)?).await
    }

    /// The address devices connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`: the base URL devices use.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Points new connections at another upstream (e.g. a restarted server).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *lock(&self.shared.upstream) = upstream;
    }

    /// Like [`Proxy::set_upstream`], from a base URL.
    pub fn set_upstream_url(&self, url: &str) -> std::io::Result<()> {
        self.set_upstream(addr_of(url)?);
        Ok(())
    }

    /// Queues faults for the next connections, in order (after those already queued).
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.shared.plan).queue.extend(faults);
    }

    /// The fault for connections once the queue is empty (initially [`Fault::Pass`]).
    pub fn set_default(&self, fault: Fault) {
        lock(&self.shared.plan).default = fault;
    }

    /// Forgets queued faults and passes everything through again.
    pub fn clear(&self) {
        let mut plan = lock(&self.shared.plan);
        plan.queue.clear();
        plan.default = Fault::Pass;
    }

    /// How many queued faults have not met a connection yet.
    pub fn queued(&self) -> usize {
        lock(&self.shared.plan).queue.len()
    }

    /// Connections accepted and faults injected so far.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            connections: self.shared.connections.load(Ordering::SeqCst),
            faults: self.shared.faults.load(Ordering::SeqCst),
        }
    }

    /// Bytes forwarded from the server to devices so far, over all connections (HTTP headers
    /// included). Sampled between two requests it tells where a response ends, so a test can
    /// aim a [`Fault::CutResponseAfter`] at a later response of a kept-alive connection.
    pub fn response_bytes(&self) -> u64 {
        self.shared.responses.bytes.load(Ordering::SeqCst)
    }

    /// Cuts, once, whichever connection would forward response byte number `total` (counted
    /// like [`Proxy::response_bytes`]), as [`Fault::CutResponseAfter`] does: aims a cut at a
    /// position of a sequence of responses whatever connections carry them (an HTTP client may
    /// open a new connection when its kept-alive one is not back in its pool yet).
    pub fn cut_responses_at(&self, total: u64) {
        self.shared.responses.cut_at([total]);
    }

    /// Bytes forwarded from devices to the server so far, over all connections (HTTP headers
    /// included): when it stops growing during an upload, the server holds the whole request.
    pub fn request_bytes(&self) -> u64 {
        self.shared.requests.bytes.load(Ordering::SeqCst)
    }

    /// Cuts whichever connection would forward request byte number `total`, for each of
    /// `totals` (counted like [`Proxy::request_bytes`]), as [`Fault::CutRequestAfter`] does. The
    /// cuts land where the bytes are whatever connections carry them, so a connection the server
    /// closes early (say after refusing a request) does not use one up.
    pub fn cut_requests_at(&self, totals: impl IntoIterator<Item = u64>) {
        self.shared.requests.cut_at(totals);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

/// The socket address of a base URL `http://host:port`.
fn addr_of(url: &str) -> std::io::Result<SocketAddr> {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority.parse().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{url}: {e}")))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let fault = {
                    let mut plan = lock(&shared.plan);
                    let default = plan.default;
                    plan.queue.pop_front().unwrap_or(default)
                };
                connections.spawn(handle(client, fault, shared.clone()));
            }
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(client: TcpStream, fault: Fault, shared: Arc<Shared>) {
    let fault_hit = || {
        shared.faults.fetch_add(1, Ordering::SeqCst);
    };
    match fault {
        Fault::Refuse => {
            fault_hit();
            drop(client);
            return;
        }
        Fault::Delay(d) => {
            fault_hit();
            tokio::time::sleep(d).await;
        }
        _ => {}
    }
    let upstream = *lock(&shared.upstream);
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_rd, client_wr) = client.into_split();
    let (server_rd, server_wr) = server.into_split();
    let (request_limit, response_limit) = match fault {
        Fault::CutRequestAfter(n) => (Some(n), None),
        Fault::CutResponseAfter(n) => (None, Some(n)),
        Fault::DropResponse => (None, Some(0)),
        _ => (None, None),
    };
    // Either direction ending (EOF, error or a cut) ends the connection: both halves are dropped.
    let ended = tokio::select! {
        e = pump(client_rd, server_wr, request_limit, &shared.requests) => e,
        e = pump(server_rd, client_wr, response_limit, &shared.responses) => e,
    };
    if ended == Ended::Cut {
        fault_hit();
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Closed,
    Cut,
}

/// Copies `from` → `to`; with a limit, forwards at most that many bytes and returns
/// [`Ended::Cut`] as soon as more would have to be forwarded. Forwarded bytes are counted in
/// `stream`, whose cut positions cut the same way.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    limit: Option<usize>,
    stream: &Stream,
) -> Ended {
    let mut buf = vec![0u8; 16 * 1024];
    let mut forwarded = 0usize;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return Ended::Closed,
            Ok(n) => n,
        };
        let allowed = stream.take(limit.map_or(n, |l| n.min(l - forwarded)));
        if allowed > 0 {
            if to.write_all(&buf[..allowed]).await.is_err() {
                return Ended::Closed;
            }
            forwarded += allowed;
        }
        if allowed < n {
            let _ = to.flush().await;
            return Ended::Cut;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// An echo server that records what it received per connection.
    async fn echo() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = received.clone();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let rec = rec.clone();
                tokio::spawn(async move {
                    let idx = {
                        let mut r = rec.lock().unwrap();
                        r.push(Vec::new());
                        r.len() - 1
                    };
                    let mut buf = [0u8; 1024];
                    loop {
                        let n = match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        rec.lock().unwrap()[idx].extend_from_slice(&buf[..n]);
                        if sock.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, received)
    }

    /// Sends `msg`, then reads until EOF or until `msg.len()` bytes came back (bounded by 5 s).
    async fn roundtrip(proxy: &Proxy, msg: &[u8]) -> Vec<u8> {
        let mut sock = TcpStream::connect(proxy.addr()).await.unwrap();
        let _ = sock.write_all(msg).await;
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        let read = async {
            while out.len() < msg.len() {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read).await.unwrap();
        out
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn passes_through_by_default() {
        let (addr, received) = echo().await;
        let proxy = Proxy::start(addr).await.unwrap();
        assert_eq!(roundtrip(&proxy, b"hello").await, b"hello");
        assert_eq!(roundtrip(&proxy, b"again").await, b"again");
        settle().await;
        assert_eq!(*received.lock().unwrap(), vec![b"hello".to_vec(), b"again".to_vec()]);
        assert_eq!(proxy.stats(), ProxyStats { connections: 2, faults: 0 });
    }

    #[tokio::test]
    async fn cuts_the_request_after_n_bytes() {
        let (addr, received) = echo().await;
        let proxy = Proxy::start(addr).await.unwrap();
        proxy.push_faults([Fault::CutRequestAfter(3)]);
        let back = roundtrip(&proxy, b"hello").await;
        assert!(back.len() <= 3, "{back:?}");
        settle().await;
        assert_eq!(received.lock().unwrap()[0], b"hel");
        assert_eq!(proxy.stats().faults, 1);
        // The queue is used up: the next connection passes.
        assert_eq!(roundtrip(&proxy, b"world").await, b"world");
    }

    #[tokio::test]
    async fn cuts_the_response_after_n_bytes() {
        let (addr, received) = echo().await;
        let proxy = Proxy::start(addr).await.unwrap();
        proxy.push_faults([Fault::CutResponseAfter(2)]);
        assert_eq!(roundtrip(&proxy, b"hello").await, b"he");
        settle().await;
        assert_eq!(received.lock().unwrap()[0], b"hello");
        assert_eq!(proxy.stats(), ProxyStats { connections: 1, faults: 1 });
    }

    #[tokio::test]
    async fn cuts_at_a_position_of_all_responses_whichever_connection_carries_it() {
        let (addr, _) = echo().await;
        let proxy = Proxy::start(addr).await.unwrap();
        proxy.cut_responses_at(7);
        assert_eq!(roundtrip(&proxy, b"hello").await, b"hello", "bytes 0..5 pass");
        assert_eq!(roundtrip(&proxy, b"world").await, b"wo", "a second connection is cut at byte 7");
        assert_eq!(proxy.stats(), ProxyStats { connections: 2, faults: 1 });
        assert_eq!(roundtrip(&proxy, b"again").await, b"again", "once");
    }

    #[tokio::test]
    async fn cuts_at_positions_of_all_requests_whichever_connections_carry_them() {
        let (addr, received) = echo().await;
        let proxy = Proxy::start(addr).await.unwrap();
        proxy.cut_requests_at([6, 3]);
        assert!(roundtrip(&proxy, b"hello").await.len() <= 3);
        assert!(roundtrip(&proxy, b"world").await.len() <= 3);
        assert_eq!(roundtrip(&proxy, b"again").await, b"again", "both positions are used up");
        settle().await;
        let received = received.lock().unwrap().clone();
        assert_eq!(received, vec![b"hel".to_vec(), b"wor".to_vec(), b"again".to_vec()]);
        assert_eq!(proxy.stats(), ProxyStats { connections: 3, faults: 2 });
        assert_eq!(proxy.request_bytes(), 11);
    }

    #[tokio::test]
    async fn drops_the_whole_response_after_the_request_arrived() {
        let (addr, received) = echo().await;
        let proxy = Proxy::start(addr).await.unwrap();
        proxy.push_faults([Fault::DropResponse]);
        assert_eq!(roundtrip(&proxy, b"hello").await, b"");
        settle().await;
        assert_eq!(received.lock().unwrap()[0], b"hello");
        assert_eq!(proxy.stats().faults, 1);
    }

    #[tokio::test]
    async fn refuses_and_delays() {
        let (addr, received) = echo().await;
        let proxy = Proxy::start(addr).await.unwrap();
        proxy.push_faults([Fault::Refuse, Fault::Delay(Duration::from_millis(200))]);
        assert_eq!(roundtrip(&proxy, b"hello").await, b"");
        let started = std::time::Instant::now();
        assert_eq!(roundtrip(&proxy, b"later").await, b"later");
        assert!(started.elapsed() >= Duration::from_millis(200));
        settle().await;
        assert_eq!(*received.lock().unwrap(), vec![b"later".to_vec()], "a refused connection never goes upstream");
        assert_eq!(proxy.stats(), ProxyStats { connections: 2, faults: 2 });
        assert_eq!(proxy.queued(), 0);
    }

    #[tokio::test]
    async fn default_fault_applies_after_the_queue_and_upstream_can_change() {
        let (first, _) = echo().await;
        let (second, received) = echo().await;
        let proxy = Proxy::start(first).await.unwrap();
        proxy.set_default(Fault::Refuse);
        assert_eq!(roundtrip(&proxy, b"x").await, b"");
        proxy.clear();
        proxy.set_upstream(second);
        assert_eq!(roundtrip(&proxy, b"y").await, b"y");
        settle().await;
        assert_eq!(*received.lock().unwrap(), vec![b"y".to_vec()]);
    }

    #[tokio::test]
    async fn stops_when_dropped() {
        let (addr, _) = echo().await;
        let proxy = Proxy::start(addr).await.unwrap();
        let at = proxy.addr();
        drop(proxy);
        settle().await;
        assert!(TcpStream::connect(at).await.is_err());
    }

    #[test]
    fn parses_base_urls() {
        assert_eq!(addr_of("http://127.0.0.1:8080").unwrap(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(addr_of("http://127.0.0.1:8080/").unwrap(), "127.0.0.1:8080".parse().unwrap());
        assert!(addr_of("http://localhost").is_err());
    }
}
