//! A registry token server (Bearer auth): users, per-repository grants, ES256 tokens.

use super::*;

/// `service` of test token-auth registries.
pub const TOKEN_SERVICE: &str = "wasm-cache-test-registry";
/// `issuer` of test tokens.
pub const TOKEN_ISSUER: &str = "wasm-cache-test-issuer";

/// A small registry token server (distribution's `auth: token`): checks Basic credentials
/// against its users and issues ES256 JWTs granting `pull` on the repositories each user (or
/// anonymous) may read.
pub struct TokenServer {
    /// `http://127.0.0.1:port/token`.
    pub realm: String,
    /// Users, public repositories and counters.
    state: Arc<TokenState>,
}

struct TokenState {
    /// user -> (password, repositories the user may pull).
    users: Mutex<HashMap<String, (String, Vec<String>)>>,
    /// Repositories anyone may pull.
    public: Mutex<Vec<String>>,
    /// Token requests answered (any outcome).
    requests: Mutex<usize>,
    /// The next token expires (for the registry, past its 60 s leeway) within seconds,
    /// although the answer says it lasts 300 s.
    short_next: Mutex<bool>,
    /// What the answers claim as `expires_in` (300 s unless a test sets an absurd one).
    expires_in: Mutex<serde_json::Value>,
    /// Bytes of padding in each answer (a hostile token service sends megabytes).
    padding: Mutex<usize>,
    /// Signing key.
    key: jsonwebtoken::EncodingKey,
    /// x5c header value (the signing certificate, DER, base64).
    x5c: String,
}

impl TokenServer {
    /// Starts a token server on 127.0.0.1.
    pub fn start() -> TokenServer {
        use base64::Engine as _;
        let pki = pki();
        let key = jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(&pki.signer_key).unwrap())
            .unwrap();
        let pem = std::fs::read_to_string(&pki.signer_cert).unwrap();
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let state = Arc::new(TokenState {
            users: Mutex::default(),
            public: Mutex::default(),
            requests: Mutex::new(0),
            short_next: Mutex::new(false),
            expires_in: Mutex::new(serde_json::json!(300)),
            padding: Mutex::new(0),
            key,
            x5c: base64::engine::general_purpose::STANDARD.encode(der),
        });
        let app = axum::Router::new()
            .route("/token", axum::routing::get(issue_token))
            .with_state(Arc::clone(&state));
        let addr = serve_on_thread("127.0.0.1:0", app);
        TokenServer {
            realm: format!("http://{addr}/token"),
            state,
        }
    }

    /// Adds (or replaces) a user who may pull `repos`.
    pub fn set_user(&self, user: &str, password: &str, repos: &[&str]) {
        self.state.users.lock().unwrap().insert(
            user.to_string(),
            (
                password.to_string(),
                repos.iter().map(|r| r.to_string()).collect(),
            ),
        );
    }

    /// Removes a user (their credentials stop working).
    pub fn remove_user(&self, user: &str) {
        self.state.users.lock().unwrap().remove(user);
    }

    /// Lets anyone pull `repo`.
    pub fn make_public(&self, repo: &str) {
        self.state.public.lock().unwrap().push(repo.to_string());
    }

    /// Makes the next token one the registry stops accepting a few seconds from now.
    pub fn next_token_short_lived(&self) {
        *self.state.short_next.lock().unwrap() = true;
    }

    /// Takes `repo` out of the repositories anyone may pull.
    pub fn make_private(&self, repo: &str) {
        self.state.public.lock().unwrap().retain(|r| r != repo);
    }

    /// Makes every answer claim this `expires_in` (any JSON value).
    pub fn set_expires_in(&self, v: serde_json::Value) {
        *self.state.expires_in.lock().unwrap() = v;
    }

    /// Pads every answer with `n` bytes (in an unknown field).
    pub fn set_padding(&self, n: usize) {
        *self.state.padding.lock().unwrap() = n;
    }

    /// Token requests so far.
    pub fn requests(&self) -> usize {
        *self.state.requests.lock().unwrap()
    }
}

async fn issue_token(
    State(st): State<Arc<TokenState>>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    use base64::Engine as _;
    *st.requests.lock().unwrap() += 1;
    let user = match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        None => None,
        Some(h) => {
            let decoded = h
                .strip_prefix("Basic ")
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|b| String::from_utf8(b).ok());
            let ok = decoded
                .as_deref()
                .and_then(|d| d.split_once(':'))
                .and_then(|(u, p)| {
                    let users = st.users.lock().unwrap();
                    users
                        .get(u)
                        .filter(|(pw, _)| pw == p)
                        .map(|_| u.to_string())
                });
            match ok {
                Some(u) => Some(u),
                None => {
                    return Response::builder()
                        .status(401)
                        .body(Body::from("bad credentials"))
                        .unwrap();
                }
            }
        }
    };
    let mut access = Vec::new();
    if let Some(scope) = q.get("scope")
        && let Some(repo) = scope
            .strip_prefix("repository:")
            .and_then(|s| s.strip_suffix(":pull"))
    {
        let allowed = st.public.lock().unwrap().iter().any(|r| r == repo)
            || user.as_ref().is_some_and(|u| {
                st.users
                    .lock()
                    .unwrap()
                    .get(u)
                    .is_some_and(|(_, repos)| repos.iter().any(|r| r == repo))
            });
        if allowed {
            access
                .push(serde_json::json!({"type": "repository", "name": repo, "actions": ["pull"]}));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // distribution accepts tokens up to 60 s past `exp`: 57 s ago leaves about 3 s.
    let exp = if std::mem::take(&mut *st.short_next.lock().unwrap()) {
        now - 57
    } else {
        now + 300
    };
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER,
        "sub": user.clone().unwrap_or_default(),
        "aud": q.get("service").cloned().unwrap_or_default(),
        "exp": exp,
        "nbf": now - 120,
        "iat": now - 120,
        "jti": format!("{now}-{}", *st.requests.lock().unwrap()),
        "access": access,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.x5c = Some(vec![st.x5c.clone()]);
    let token = jsonwebtoken::encode(&header, &claims, &st.key).unwrap();
    let expires_in = st.expires_in.lock().unwrap().clone();
    let padding = "x".repeat(*st.padding.lock().unwrap());
    axum::Json(serde_json::json!({"token": token, "expires_in": expires_in, "padding": padding}))
        .into_response()
}
