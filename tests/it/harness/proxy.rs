//! A counting proxy in front of a registry, with fault injection.

use super::*;

/// Forwards to a registry and counts requests by `METHOD path`, so tests can assert exactly
/// what the daemon asked upstream. Counts are final by the time the daemon has its answer.
pub struct CountingProxy {
    /// `127.0.0.1:port` the daemon talks to.
    pub addr: String,
    /// Shared state with the proxy task.
    state: Arc<ProxyState>,
}

/// An injected answer: path substring, how many more times, status, `WWW-Authenticate`.
type Fault = (String, usize, u16, Option<String>);

struct ProxyState {
    upstream: String,
    counts: Mutex<HashMap<String, usize>>,
    /// Per path substring: how many more requests answer with the given status (and
    /// `WWW-Authenticate` header, if any).
    faults: Mutex<Vec<Fault>>,
    client: reqwest::Client,
}

impl CountingProxy {
    /// Starts a proxy to `upstream` on its own thread and runtime.
    pub fn start(upstream: &str) -> CountingProxy {
        let state = Arc::new(ProxyState {
            upstream: upstream.to_string(),
            counts: Mutex::new(HashMap::new()),
            faults: Mutex::new(Vec::new()),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(Arc::clone(&state));
        let addr = serve_on_thread("127.0.0.1:0", app).to_string();
        CountingProxy { addr, state }
    }

    /// Requests seen whose `METHOD path` starts with `prefix` (e.g. `GET /v2/repo/blobs/`).
    pub fn count(&self, prefix: &str) -> usize {
        self.state
            .counts
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    }

    /// Requests seen for repository `repo` (any method, manifests and blobs).
    pub fn repo_count(&self, repo: &str) -> usize {
        let needle = format!(" /v2/{repo}/");
        self.state
            .counts
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.contains(&needle))
            .map(|(_, v)| v)
            .sum()
    }

    /// Makes the next `n` requests whose path contains `path_part` answer `status`.
    pub fn fail_next(&self, path_part: &str, n: usize, status: u16) {
        self.state
            .faults
            .lock()
            .unwrap()
            .push((path_part.to_string(), n, status, None));
    }

    /// Makes the next `n` requests whose path contains `path_part` answer `401` with the
    /// Bearer challenge `challenge`, as a registry does for a token that expired.
    pub fn reject_token_next(&self, path_part: &str, n: usize, challenge: &str) {
        self.state.faults.lock().unwrap().push((
            path_part.to_string(),
            n,
            401,
            Some(challenge.to_string()),
        ));
    }
}

async fn forward(State(st): State<Arc<ProxyState>>, req: Request) -> Response {
    let method = req.method().clone();
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let path = req.uri().path().to_string();
    *st.counts
        .lock()
        .unwrap()
        .entry(format!("{method} {path}"))
        .or_default() += 1;
    {
        let mut faults = st.faults.lock().unwrap();
        if let Some(f) = faults.iter_mut().find(|f| f.1 > 0 && path.contains(&f.0)) {
            f.1 -= 1;
            let mut b = Response::builder().status(f.2);
            if let Some(c) = &f.3 {
                b = b.header("www-authenticate", c);
            }
            return b.body(Body::from("injected fault")).unwrap();
        }
    }
    let headers: HeaderMap = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap();
    let mut out = st
        .client
        .request(method, format!("http://{}{pq}", st.upstream))
        .body(body);
    for name in ["accept", "authorization", "content-type"] {
        for v in headers.get_all(name) {
            out = out.header(name, v);
        }
    }
    let resp = match out.send().await {
        Ok(r) => r,
        Err(_) => {
            return Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Body::empty())
                .unwrap();
        }
    };
    let mut b = Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        if matches!(
            k.as_str(),
            "content-type"
                | "docker-content-digest"
                | "content-length"
                | "www-authenticate"
                | "etag"
                | "location"
        ) {
            b = b.header(k, v);
        }
    }
    let bytes = resp.bytes().await.unwrap_or_default();
    b.body(Body::from(bytes)).unwrap()
}
