//! Test HTTP servers for http(s) sources.

use super::*;

/// A tiny HTTP server for `http(s)://` tests: serves fixed routes, counts requests, can
/// fail the first N requests of a route.
pub struct HttpServer {
    /// `127.0.0.1:port`.
    pub addr: SocketAddr,
    /// Requests per path.
    counts: Arc<Mutex<HashMap<String, usize>>>,
    /// When each request per path arrived.
    seen: Arc<Mutex<HashMap<String, Vec<std::time::Instant>>>>,
}

/// One route of [`HttpServer`].
#[derive(Clone)]
pub enum Route {
    /// 200 with these bytes (with an ETag, honouring If-None-Match).
    Bytes(Vec<u8>),
    /// Like `Bytes`, with content the test may replace.
    Mutable(Arc<Mutex<Vec<u8>>>),
    /// `status` for the first `n` requests, then 200 with the bytes.
    FailFirst(usize, u16, Vec<u8>),
    /// 302 to this url.
    Redirect(String),
    /// 200 with a declared length, `n` bytes of body, then silence (the connection stays open).
    Stall(usize),
    /// The first request gets half of the bytes and then a broken connection; later ones all.
    CutOnce(Vec<u8>),
    /// 200 with no declared length and a body that never ends.
    Endless,
    /// 200 with a declared length of `n` bytes, sent one byte every `every`.
    Drip(usize, std::time::Duration),
    /// `429` with `Retry-After: secs` for the first `n` requests, then 200 with the bytes.
    RetryAfter(usize, u64, Vec<u8>),
    /// 200 with these bytes, sent only once the test notifies the gate.
    Gate(Arc<tokio::sync::Notify>, Vec<u8>),
}

impl HttpServer {
    /// Starts serving `routes` on 127.0.0.1 (thread + runtime of its own).
    pub fn start(routes: Vec<(&str, Route)>) -> HttpServer {
        Self::start_on("127.0.0.1:0", routes)
    }

    /// Starts serving `routes` on `bind`.
    pub fn start_on(bind: &str, routes: Vec<(&str, Route)>) -> HttpServer {
        let routes: HashMap<String, Route> = routes
            .into_iter()
            .map(|(p, r)| (p.to_string(), r))
            .collect();
        let routes = Arc::new(routes);
        let counts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let c = Arc::clone(&counts);
        let seen: Arc<Mutex<HashMap<String, Vec<std::time::Instant>>>> = Arc::default();
        let t = Arc::clone(&seen);
        let app = axum::Router::new().fallback(move |req: Request| {
            let routes = Arc::clone(&routes);
            let c = Arc::clone(&c);
            let times = Arc::clone(&t);
            async move {
                let path = req.uri().path().to_string();
                let n = {
                    let mut m = c.lock().unwrap();
                    let e = m.entry(path.clone()).or_default();
                    *e += 1;
                    *e
                };
                times
                    .lock()
                    .unwrap()
                    .entry(path.clone())
                    .or_default()
                    .push(std::time::Instant::now());
                let resp =
                    |s: u16, b: Vec<u8>| Response::builder().status(s).body(Body::from(b)).unwrap();
                let if_none_match = req
                    .headers()
                    .get("if-none-match")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                match routes.get(&path) {
                    None => resp(404, b"no such file".to_vec()),
                    // Static files carry an ETag and honour If-None-Match, as web servers do.
                    Some(route @ (Route::Bytes(_) | Route::Mutable(_))) => {
                        let b = match route {
                            Route::Mutable(m) => m.lock().unwrap().clone(),
                            Route::Bytes(b) => b.clone(),
                            _ => unreachable!(),
                        };
                        let b = &b;
                        let etag = format!("\"{}\"", sha(b));
                        if if_none_match.as_deref() == Some(etag.as_str()) {
                            *c.lock().unwrap().entry(format!("304 {path}")).or_default() += 1;
                            return Response::builder().status(304).body(Body::empty()).unwrap();
                        }
                        Response::builder()
                            .status(200)
                            .header("etag", etag)
                            .body(Body::from(b.clone()))
                            .unwrap()
                    }
                    Some(Route::FailFirst(k, s, b)) if n <= *k => {
                        let _ = b;
                        resp(*s, b"try again".to_vec())
                    }
                    Some(Route::FailFirst(_, _, b)) => resp(200, b.clone()),
                    Some(Route::Stall(n)) => {
                        let first = vec![0u8; *n];
                        let stream = futures_util::stream::once(async move {
                            Ok::<_, std::io::Error>(axum::body::Bytes::from(first))
                        })
                        .chain(futures_util::stream::pending());
                        Response::builder()
                            .status(200)
                            .header("content-length", (n * 4).to_string())
                            .body(Body::from_stream(stream))
                            .unwrap()
                    }
                    Some(Route::CutOnce(b)) if n == 1 => {
                        let half = axum::body::Bytes::from(b[..b.len() / 2].to_vec());
                        let stream = futures_util::stream::iter([
                            Ok(half),
                            Err(std::io::Error::other("connection reset by the test server")),
                        ]);
                        Response::builder()
                            .status(200)
                            .header("content-length", b.len().to_string())
                            .body(Body::from_stream(stream))
                            .unwrap()
                    }
                    Some(Route::CutOnce(b)) => resp(200, b.clone()),
                    Some(Route::Endless) => {
                        let chunk = axum::body::Bytes::from(vec![0u8; 64 << 10]);
                        let stream = futures_util::stream::repeat_with(move || {
                            Ok::<_, std::io::Error>(chunk.clone())
                        });
                        Response::builder()
                            .status(200)
                            .body(Body::from_stream(stream))
                            .unwrap()
                    }
                    Some(Route::Drip(n, every)) => {
                        let every = *every;
                        let stream = futures_util::stream::iter(0..*n).then(move |_| async move {
                            tokio::time::sleep(every).await;
                            Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"x"))
                        });
                        Response::builder()
                            .status(200)
                            .header("content-length", n.to_string())
                            .body(Body::from_stream(stream))
                            .unwrap()
                    }
                    Some(Route::RetryAfter(k, secs, _)) if n <= *k => Response::builder()
                        .status(429)
                        .header("retry-after", secs.to_string())
                        .body(Body::from("slow down"))
                        .unwrap(),
                    Some(Route::RetryAfter(_, _, b)) => resp(200, b.clone()),
                    Some(Route::Gate(gate, b)) => {
                        let (gate, b) = (Arc::clone(gate), b.clone());
                        let len = b.len();
                        let stream = futures_util::stream::once(async move {
                            gate.notified().await;
                            Ok::<_, std::io::Error>(axum::body::Bytes::from(b))
                        });
                        Response::builder()
                            .status(200)
                            .header("content-length", len.to_string())
                            .body(Body::from_stream(stream))
                            .unwrap()
                    }
                    Some(Route::Redirect(to)) => Response::builder()
                        .status(302)
                        .header("location", to)
                        .body(Body::empty())
                        .unwrap(),
                }
            }
        });
        let addr = serve_on_thread(bind, app);
        HttpServer { addr, counts, seen }
    }

    /// Requests for `path` answered `304 Not Modified`.
    pub fn not_modified(&self, path: &str) -> usize {
        self.count(&format!("304 {path}"))
    }

    /// When each request for `path` arrived.
    pub fn times(&self, path: &str) -> Vec<std::time::Instant> {
        self.seen
            .lock()
            .unwrap()
            .get(path)
            .cloned()
            .unwrap_or_default()
    }

    /// Requests seen for `path`.
    pub fn count(&self, path: &str) -> usize {
        self.counts.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}
