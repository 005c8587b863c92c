//! The network guard: which addresses the daemon may connect to.
//!
//! By default loopback, link-local (cloud metadata at 169.254.169.254 included), unspecified and
//! multicast addresses are refused; `[network] allow_cidrs` re-allows ranges and
//! `[network] deny_cidrs` refuses more. It is enforced at connection time through a DNS
//! resolver (so every redirect is covered) and on IP-literal hosts before each request.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::error::{Code, Error};

/// Ranges refused unless re-allowed.
const DEFAULT_DENY: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "100.100.100.200/32",
    // Carrier-grade NAT (shared address space), and the Azure and Oracle metadata services.
    "100.64.0.0/10",
    "168.63.129.16/32",
    "192.0.0.192/32",
    "::/128",
    "::1/128",
    "fe80::/10",
    "ff00::/8",
    "fd00:ec2::254/128",
];

/// Decides whether an address may be connected to.
#[derive(Debug, Clone)]
pub struct NetGuard {
    /// Built-in denied ranges.
    default_deny: Vec<IpNet>,
    /// Ranges re-allowed by config.
    allow: Vec<IpNet>,
    /// Ranges denied by config; they win over `allow`.
    deny: Vec<IpNet>,
}

/// The error a refused connection carries through reqwest, recognised by [`is_denied`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

impl NetGuard {
    /// A guard with the default denials plus config.
    pub fn new(allow: Vec<IpNet>, deny: Vec<IpNet>) -> Self {
        let default_deny = DEFAULT_DENY
            .iter()
            .map(|s| s.parse().expect("built-in CIDR"))
            .collect();
        NetGuard {
            default_deny,
            allow,
            deny,
        }
    }

    /// True when connecting to `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        // An IPv6 form of an IPv4 address is refused when the IPv4 address would be.
        if let Some(v4) = embedded_ipv4(ip)
            && !self.allows(IpAddr::V4(v4))
        {
            return false;
        }
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        !self.default_deny.iter().any(|n| n.contains(&ip))
    }

    /// Refuses a url whose host is an IP literal in a denied range. Host names are checked
    /// when they resolve (see [`GuardedResolver`]).
    pub fn check_url(&self, url: &Url) -> Result<(), Error> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        if self.allows(ip) {
            Ok(())
        } else {
            Err(forbidden(ip, url.host_str().unwrap_or_default()))
        }
    }

    /// A reqwest resolver that drops denied addresses (and fails when none remain).
    pub fn resolver(self: &Arc<Self>) -> Arc<GuardedResolver> {
        Arc::new(GuardedResolver {
            guard: Arc::clone(self),
        })
    }
}

/// The IPv4 address inside a NAT64 (`64:ff9b::/96`), 6to4 (`2002::/16`) or IPv4-compatible
/// (`::a.b.c.d`) IPv6 address. (IPv4-mapped addresses are canonicalised before.)
fn embedded_ipv4(ip: IpAddr) -> Option<std::net::Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    let seg = v6.segments();
    let from = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        std::net::Ipv4Addr::new(a, b, c, d)
    };
    match seg {
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(from(hi, lo)),
        [0x2002, hi, lo, ..] => Some(from(hi, lo)),
        // `::` and `::1` are IPv6's own unspecified and loopback addresses.
        [0, 0, 0, 0, 0, 0, hi, lo] if (hi, lo) > (0, 1) => Some(from(hi, lo)),
        _ => None,
    }
}

fn forbidden(ip: IpAddr, host: &str) -> Error {
    Error::new(
        Code::Forbidden,
        format!(
            "connecting to {host} ({ip}) is refused by the network guard; see [network] allow_cidrs"
        ),
    )
}

/// True when `err` (or anything it wraps) is a network-guard refusal.
pub fn is_denied(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(d) = e.downcast_ref::<Denied>() {
            return Some(d.0.clone());
        }
        cur = e.source();
    }
    None
}

/// System DNS resolution filtered through a [`NetGuard`].
#[derive(Debug)]
pub struct GuardedResolver {
    /// The policy applied to every resolved address.
    guard: Arc<NetGuard>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = Arc::clone(&self.guard);
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| guard.allows(a.ip()))
                .collect();
            if allowed.is_empty() {
                let ip = addrs
                    .first()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let err: Box<dyn std::error::Error + Send + Sync> = Box::new(Denied(format!(
                    "connecting to {host} ({ip}) is refused by the network guard; see [network] allow_cidrs"
                )));
                return Err(err);
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_refuse_loopback_and_metadata_only() {
        let g = NetGuard::new(vec![], vec![]);
        for bad in [
            "127.0.0.1",
            "169.254.169.254",
            "::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "fe80::1",
        ] {
            assert!(!g.allows(bad.parse().unwrap()), "{bad}");
        }
        for ok in ["10.1.2.3", "8.8.8.8", "2001:db8::1"] {
            assert!(g.allows(ok.parse().unwrap()), "{ok}");
        }
    }

    /// Issue 9: IPv6 spellings of refused IPv4 addresses, shared address space and the
    /// other clouds' metadata addresses got through.
    #[test]
    fn issue_9_ipv6_forms_of_refused_ipv4_and_more_metadata_addresses_are_refused() {
        let g = NetGuard::new(vec![], vec![]);
        for bad in [
            "64:ff9b::7f00:1",    // NAT64 of 127.0.0.1
            "64:ff9b::a9fe:a9fe", // NAT64 of 169.254.169.254
            "2002:7f00:1::",      // 6to4 of 127.0.0.1
            "2002:a9fe:a9fe::1",  // 6to4 of 169.254.169.254
            "::127.0.0.1",        // IPv4-compatible
            "::169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "168.63.129.16",
            "192.0.0.192",
        ] {
            assert!(!g.allows(bad.parse().unwrap()), "{bad}");
        }
        for ok in [
            "64:ff9b::808:808",
            "2002:808:808::1",
            "::8.8.8.8",
            "100.128.0.1",
        ] {
            assert!(g.allows(ok.parse().unwrap()), "{ok}");
        }
        // Re-allowing the IPv4 range re-allows its IPv6 forms.
        let g = NetGuard::new(
            vec![
                "127.0.0.0/8".parse().unwrap(),
                "64:ff9b::/96".parse().unwrap(),
            ],
            vec![],
        );
        assert!(g.allows("64:ff9b::7f00:1".parse().unwrap()));
    }

    #[test]
    fn allow_reopens_and_deny_wins() {
        let g = NetGuard::new(
            vec!["127.0.0.0/8".parse().unwrap()],
            vec!["127.0.0.2/32".parse().unwrap()],
        );
        assert!(g.allows("127.0.0.1".parse().unwrap()));
        assert!(!g.allows("127.0.0.2".parse().unwrap()));
        assert!(!g.allows("169.254.169.254".parse().unwrap()));
    }

    #[test]
    fn ip_literal_urls_are_checked() {
        let g = NetGuard::new(vec![], vec![]);
        let err = g
            .check_url(&Url::parse("http://169.254.169.254/x").unwrap())
            .unwrap_err();
        assert_eq!(err.code, Code::Forbidden);
        g.check_url(&Url::parse("http://example.com/x").unwrap())
            .unwrap();
    }
}
