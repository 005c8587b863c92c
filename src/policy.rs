//! Pull policy: what a request may do with the cache, and when it must go upstream.
//!
//! Only [`crate::service`] consults this; fetchers never see the policy.

use std::str::FromStr;

use crate::error::Error;
use crate::source::Source;

/// `imagePullPolicy` as a request states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Unset / `UNSPECIFIED_POLICY`: `Always` for an OCI `latest` (or untagged) reference,
    /// else `IfNotPresent`.
    #[default]
    Unspecified,
    /// Use the cached module when there is one.
    IfNotPresent,
    /// Re-resolve when the plugin resource changes (or on every request without a version).
    Always,
    /// Only ever serve from the cache.
    Never,
}

impl FromStr for PullPolicy {
    type Err = Error;

    /// Accepts `IfNotPresent`, `Always`, `Never`, `UNSPECIFIED_POLICY` (and the empty
    /// string), in any case and with or without underscores.
    fn from_str(s: &str) -> Result<Self, Error> {
        let norm: String = s
            .chars()
            .filter(|c| *c != '_' && *c != '-')
            .collect::<String>()
            .to_ascii_lowercase();
        match norm.as_str() {
            "" | "unspecified" | "unspecifiedpolicy" => Ok(PullPolicy::Unspecified),
            "ifnotpresent" => Ok(PullPolicy::IfNotPresent),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            _ => Err(Error::invalid(format!(
                "invalid pullPolicy {s:?}: expected IfNotPresent, Always, Never or UNSPECIFIED_POLICY"
            ))),
        }
    }
}

/// The policy in force once the default is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effective {
    /// See [`PullPolicy::IfNotPresent`].
    IfNotPresent,
    /// See [`PullPolicy::Always`].
    Always,
    /// See [`PullPolicy::Never`].
    Never,
}

impl PullPolicy {
    /// Applies the Kubernetes default: `latest` (written or implied) means `Always`.
    pub fn effective(self, source: &Source) -> Effective {
        match self {
            PullPolicy::IfNotPresent => Effective::IfNotPresent,
            PullPolicy::Always => Effective::Always,
            PullPolicy::Never => Effective::Never,
            PullPolicy::Unspecified => match source {
                Source::Oci(r) if r.is_latest() => Effective::Always,
                _ => Effective::IfNotPresent,
            },
        }
    }
}

/// What the cache knows about a request.
#[derive(Debug, Clone, Copy)]
pub struct Known {
    /// The request names a digest (url pin or `sha256`).
    pub digest_known: bool,
    /// The cache holds content of this source answering to every known digest.
    pub digest_hit: bool,
    /// The cache holds a record for this exact location.
    pub location_cached: bool,
    /// The request carries a resource version and the record was resolved for it already.
    pub version_seen: bool,
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Serve the cached module matching the known digest.
    ServeDigest,
    /// Serve the cached module recorded for the location.
    ServeLocation,
    /// Ask upstream whether the location changed; download only if it did.
    Revalidate,
    /// Download.
    Fetch,
    /// Refuse: not cached and the policy forbids fetching.
    NotPresent,
}

/// The pull-policy rules, in one place.
pub fn decide(policy: Effective, k: Known) -> Action {
    if k.digest_known {
        // A known digest is served from the cache whatever the policy.
        return match (k.digest_hit, policy) {
            (true, _) => Action::ServeDigest,
            (false, Effective::Never) => Action::NotPresent,
            (false, _) => Action::Fetch,
        };
    }
    match (policy, k.location_cached) {
        (Effective::Never, true) | (Effective::IfNotPresent, true) => Action::ServeLocation,
        (Effective::Never, false) => Action::NotPresent,
        (_, false) => Action::Fetch,
        (Effective::Always, true) if k.version_seen => Action::ServeLocation,
        (Effective::Always, true) => Action::Revalidate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(s: &str) -> Source {
        Source::parse(s).unwrap()
    }

    #[test]
    fn defaults_follow_kubernetes() {
        let u = PullPolicy::Unspecified;
        assert_eq!(u.effective(&src("reg.io/a:latest")), Effective::Always);
        assert_eq!(u.effective(&src("reg.io/a")), Effective::Always);
        assert_eq!(u.effective(&src("reg.io/a:1.0")), Effective::IfNotPresent);
        let pinned = format!("reg.io/a@sha256:{}", "b".repeat(64));
        assert_eq!(u.effective(&src(&pinned)), Effective::IfNotPresent);
        assert_eq!(
            u.effective(&src("https://h/latest")),
            Effective::IfNotPresent
        );
        assert_eq!(
            PullPolicy::Never.effective(&src("reg.io/a")),
            Effective::Never
        );
    }

    #[test]
    fn parses_policies() {
        assert_eq!(
            "IfNotPresent".parse::<PullPolicy>().unwrap(),
            PullPolicy::IfNotPresent
        );
        assert_eq!(
            "IF_NOT_PRESENT".parse::<PullPolicy>().unwrap(),
            PullPolicy::IfNotPresent
        );
        assert_eq!(
            "UNSPECIFIED_POLICY".parse::<PullPolicy>().unwrap(),
            PullPolicy::Unspecified
        );
        assert_eq!("always".parse::<PullPolicy>().unwrap(), PullPolicy::Always);
        assert!("sometimes".parse::<PullPolicy>().is_err());
    }

    #[test]
    fn decision_table() {
        let k = |digest_known, digest_hit, location_cached, version_seen| Known {
            digest_known,
            digest_hit,
            location_cached,
            version_seen,
        };
        use Action::*;
        use Effective::*;
        assert_eq!(decide(Always, k(true, true, false, false)), ServeDigest);
        assert_eq!(decide(Never, k(true, false, true, false)), NotPresent);
        assert_eq!(decide(IfNotPresent, k(true, false, true, false)), Fetch);
        assert_eq!(
            decide(IfNotPresent, k(false, false, true, false)),
            ServeLocation
        );
        assert_eq!(decide(IfNotPresent, k(false, false, false, false)), Fetch);
        assert_eq!(decide(Never, k(false, false, true, false)), ServeLocation);
        assert_eq!(decide(Never, k(false, false, false, false)), NotPresent);
        assert_eq!(decide(Always, k(false, false, true, true)), ServeLocation);
        assert_eq!(decide(Always, k(false, false, true, false)), Revalidate);
        assert_eq!(decide(Always, k(false, false, false, false)), Fetch);
    }
}
