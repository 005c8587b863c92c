//! Remembered failures (the negative cache): a fetch that failed upstream is answered from
//! memory with the same error for `[fetch] negative_ttl`, so a broken url does not turn
//! hundreds of proxies into hundreds of upstream requests. While callers keep asking, one
//! background retry runs at a time, with backoff, so that the first request after the
//! registry comes back is a hit. A request with another `resourceVersion` is not answered
//! from here (its control plane may have fixed what failed).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Code, Error};

/// Failures remembered at most (the oldest go first).
const MAX_ENTRIES: usize = 4096;
/// The first background retry waits this long after the failure.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// One remembered failure.
#[derive(Debug)]
struct Failure {
    /// The error the fetch ended with.
    error: Error,
    /// The `resourceVersion` of the request that failed.
    version: Option<String>,
    /// When it (or its last background retry) failed; answered until `at + ttl`.
    at: Instant,
    /// When the next background retry may start.
    retry_at: Instant,
    /// Background retries so far (the backoff doubles with each).
    attempts: u32,
    /// A background retry is running.
    retrying: bool,
}

/// What a request finds.
#[derive(Debug)]
pub enum Lookup {
    /// Nothing remembered (or another `resourceVersion`): go upstream.
    Miss,
    /// Answer with this error.
    Failed(Error),
    /// Answer with this error, and start the one background retry now.
    FailedRetryNow(Error),
}

/// The remembered failures of one daemon.
#[derive(Debug)]
pub struct Failures {
    /// By flight key (location, expected digest, caller).
    map: Mutex<HashMap<String, Failure>>,
    /// How long a failure is answered from memory (zero: never); also the longest wait
    /// between background retries, so at least one runs while a failure is remembered.
    ttl: Duration,
}

/// Whether a failure with `code` is remembered: what the upstream said or did, not what the
/// request or this node got wrong.
pub fn remembered(code: Code) -> bool {
    matches!(
        code,
        Code::NotFound
            | Code::UpstreamError
            | Code::Timeout
            | Code::AccessDenied
            | Code::InvalidModule
            | Code::ChecksumMismatch
            | Code::TooLarge
            | Code::SignatureInvalid
    )
}

impl Failures {
    /// Remembers failures for `ttl`.
    pub fn new(ttl: Duration) -> Failures {
        Failures {
            map: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Failure>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a request for `key` with `version` finds.
    pub fn lookup(&self, key: &str, version: Option<&str>) -> Lookup {
        if self.ttl.is_zero() {
            return Lookup::Miss;
        }
        let now = Instant::now();
        let mut map = self.lock();
        let Some(f) = map.get_mut(key) else {
            return Lookup::Miss;
        };
        if now >= f.at + self.ttl {
            map.remove(key);
            return Lookup::Miss;
        }
        if f.version.as_deref() != version {
            return Lookup::Miss;
        }
        let error = f.error.clone();
        if !f.retrying && now >= f.retry_at {
            f.retrying = true;
            return Lookup::FailedRetryNow(error);
        }
        Lookup::Failed(error)
    }

    /// Notes that the fetch for `key` (with `version`) failed with `error`, when it is a
    /// failure worth remembering. (Every caller that shared the failed flight reports it; the
    /// backoff of a failure already remembered is kept.)
    pub fn failed(&self, key: &str, version: Option<&str>, error: &Error) {
        if self.ttl.is_zero() || !remembered(error.code) {
            return;
        }
        let now = Instant::now();
        if let Some(f) = self.lock().get_mut(key)
            && f.version.as_deref() == version
        {
            f.error = error.clone();
            f.at = now;
            return;
        }
        self.insert(key, version, error, 0);
    }

    /// Notes that a background retry of `key` failed: the failure is extended and the next
    /// retry backs off further.
    pub fn retry_failed(&self, key: &str, version: Option<&str>, error: &Error) {
        if self.ttl.is_zero() || !remembered(error.code) {
            self.lock().remove(key);
            return;
        }
        let attempts = self.lock().get(key).map_or(0, |f| f.attempts + 1);
        self.insert(key, version, error, attempts);
    }

    fn insert(&self, key: &str, version: Option<&str>, error: &Error, attempts: u32) {
        let now = Instant::now();
        let mut map = self.lock();
        if map.len() >= MAX_ENTRIES && !map.contains_key(key) {
            map.retain(|_, f| now < f.at + self.ttl);
            if map.len() >= MAX_ENTRIES
                && let Some(oldest) = map.iter().min_by_key(|(_, f)| f.at).map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        let backoff = FIRST_RETRY
            .saturating_mul(1u32 << attempts.min(16))
            .min(self.ttl.max(FIRST_RETRY));
        map.insert(
            key.to_string(),
            Failure {
                error: error.clone(),
                version: version.map(str::to_string),
                at: now,
                retry_at: now + backoff,
                attempts,
                retrying: false,
            },
        );
    }

    /// Forgets the failure of `key` (a fetch for it succeeded).
    pub fn succeeded(&self, key: &str) {
        if !self.ttl.is_zero() {
            self.lock().remove(key);
        }
    }

    /// Failures remembered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: Code) -> Error {
        Error::new(code, "boom")
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_answered_until_its_ttl_and_then_forgotten() {
        let f = Failures::new(Duration::from_secs(10));
        f.failed("k", None, &err(Code::UpstreamError));
        assert!(matches!(f.lookup("k", None), Lookup::Failed(e) if e.code == Code::UpstreamError));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(matches!(f.lookup("k", None), Lookup::Miss));
        assert!(f.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn another_resource_version_goes_upstream() {
        let f = Failures::new(Duration::from_secs(10));
        f.failed("k", Some("1"), &err(Code::NotFound));
        assert!(matches!(f.lookup("k", Some("2")), Lookup::Miss));
        assert!(matches!(f.lookup("k", Some("1")), Lookup::Failed(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn one_background_retry_at_a_time_with_backoff() {
        let f = Failures::new(Duration::from_secs(10));
        f.failed("k", None, &err(Code::Timeout));
        assert!(matches!(f.lookup("k", None), Lookup::Failed(_)));
        tokio::time::advance(FIRST_RETRY).await;
        assert!(matches!(f.lookup("k", None), Lookup::FailedRetryNow(_)));
        assert!(
            matches!(f.lookup("k", None), Lookup::Failed(_)),
            "one retry at a time"
        );
        // The retry fails: the failure is extended and the next retry waits twice as long.
        f.retry_failed("k", None, &err(Code::Timeout));
        tokio::time::advance(FIRST_RETRY).await;
        assert!(matches!(f.lookup("k", None), Lookup::Failed(_)));
        tokio::time::advance(FIRST_RETRY).await;
        assert!(matches!(f.lookup("k", None), Lookup::FailedRetryNow(_)));
        f.succeeded("k");
        assert!(matches!(f.lookup("k", None), Lookup::Miss));
    }

    #[test]
    fn only_upstream_failures_are_remembered() {
        let f = Failures::new(Duration::from_secs(10));
        for code in [
            Code::InvalidRequest,
            Code::Internal,
            Code::StorageFull,
            Code::NotPresent,
            Code::Forbidden,
        ] {
            f.failed("k", None, &err(code));
            assert!(f.is_empty(), "{code:?}");
        }
    }

    #[test]
    fn the_number_of_failures_is_bounded() {
        let f = Failures::new(Duration::from_secs(10));
        for i in 0..MAX_ENTRIES + 10 {
            f.failed(&format!("k{i}"), None, &err(Code::NotFound));
        }
        assert_eq!(f.len(), MAX_ENTRIES);
    }
}
