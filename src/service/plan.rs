//! What to do with a request, given the cache: the index lookups that feed the pull-policy
//! rules ([`crate::policy::decide`]), and the record each branch needs, carried in the plan.

use crate::cache::Cache;
use crate::cache::index::Record;
use crate::digest::Digest;
use crate::policy::{Action, Effective, Known, decide};

use super::FetchRequest;

/// What a request will do, with what it needs for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Serve this cached record (once the caller's access allows).
    Serve(Record),
    /// Ask upstream whether this cached record is still current; download only if not.
    Revalidate(Record),
    /// Download.
    Fetch,
    /// Refuse: not cached and the policy forbids fetching.
    NotPresent,
}

impl Plan {
    /// The cached record the plan serves, if it serves one.
    pub fn served(&self) -> Option<&Record> {
        match self {
            Plan::Serve(r) => Some(r),
            _ => None,
        }
    }
}

/// The digests a request pins: the url's `@sha256:` and the `sha256` field.
pub fn expected_digests(req: &FetchRequest) -> Vec<Digest> {
    let mut v: Vec<Digest> = req.source.pinned_digest().into_iter().collect();
    if let Some(d) = req.sha256
        && !v.contains(&d)
    {
        v.push(d);
    }
    v
}

/// Looks at the cache and applies `policy`.
pub fn plan(cache: &Cache, req: &FetchRequest, policy: Effective) -> Plan {
    let expected = expected_digests(req);
    let digest_rec = if expected.is_empty() {
        None
    } else {
        cache.record_by_digests(&req.source.source_key(), &expected)
    };
    let loc_rec = cache.record(&req.source.location_key());
    let version_seen = match (&req.resource_version, &loc_rec) {
        (Some(v), Some(r)) => r.versions.get(req.resource_name.as_deref().unwrap_or("")) == Some(v),
        _ => false,
    };
    let action = decide(
        policy,
        Known {
            digest_known: !expected.is_empty(),
            digest_hit: digest_rec.is_some(),
            location_cached: loc_rec.is_some(),
            version_seen,
        },
    );
    match (action, digest_rec, loc_rec) {
        (Action::ServeDigest, Some(r), _) => Plan::Serve(r),
        (Action::ServeLocation, _, Some(r)) => Plan::Serve(r),
        (Action::Revalidate, _, Some(r)) => Plan::Revalidate(r),
        (Action::NotPresent, _, _) => Plan::NotPresent,
        // `decide` serves or revalidates only what it was told is cached; anything else
        // is a fetch.
        _ => Plan::Fetch,
    }
}
