//! Registry mirrors, the containerd way: `[registries] config_path` holds
//! `<host[:port]>/hosts.toml` files (and `_default/hosts.toml`) in containerd's format, and
//! `[registries."host"] mirrors = [...]` lists mirrors for nodes without containerd.
//!
//! A mirror is an [`Endpoint`] with its own TLS settings (`ca`, `client`, `skip_verify`),
//! API path (`override_path`), headers, and capabilities (`pull`: manifests by digest and
//! blobs; `resolve`: tags). Mirrors are tried in file order, then the registry itself.
//! Requests to a mirror carry `?ns=<registry>` as containerd's do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Url};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Largest hosts.toml read.
const MAX_HOSTS_FILE: u64 = 64 << 10;

/// One mirror of a registry.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `scheme://host[:port]` with the API path prefix (ending in `/v2` unless
    /// `override_path`), ending with `/`.
    pub api: Url,
    /// `host[:port]`, for logs and metrics.
    pub name: String,
    /// May serve manifests by digest and blobs.
    pub pull: bool,
    /// May resolve tags.
    pub resolve: bool,
    /// Its client (its TLS settings; the network guard applies as to every client).
    pub client: Client,
    /// Headers sent with every request.
    pub headers: HeaderMap,
}

/// The mirrors of every registry.
#[derive(Debug, Default, Clone)]
pub struct Mirrors {
    /// By registry (`host[:port]` as in references).
    by_registry: HashMap<String, Vec<Endpoint>>,
    /// From `_default/hosts.toml`, for registries without their own.
    default: Vec<Endpoint>,
}

impl Mirrors {
    /// The mirrors of `registry`, in the order they are tried.
    pub fn of(&self, registry: &str) -> &[Endpoint] {
        self.by_registry
            .get(registry)
            .map_or(self.default.as_slice(), Vec::as_slice)
    }

    /// True when no registry has a mirror.
    pub fn is_empty(&self) -> bool {
        self.by_registry.is_empty() && self.default.is_empty()
    }
}

/// What builds a mirror's client: extra roots, a client certificate, whether to skip
/// verification.
pub type ClientFactory<'a> =
    dyn Fn(Vec<reqwest::Certificate>, Option<reqwest::Identity>, bool) -> Result<Client> + 'a;

/// A hosts.toml as read (`server` and other keys are not used: the registry itself is
/// always the last host).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HostsFile {
    /// Mirrors by url, in file order.
    host: toml::Table,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    ca: Option<StringOrList>,
    client: Option<ClientCerts>,
    skip_verify: bool,
    override_path: bool,
    header: HashMap<String, StringOrList>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

/// `client = "cert.pem"`, `client = ["cert.pem", "key.pem"]` or
/// `client = [["cert.pem", "key.pem"]]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ClientCerts {
    One(String),
    Pair(Vec<String>),
    Pairs(Vec<Vec<String>>),
}

/// Reads the mirrors: `config_path` (containerd's directory) and `listed` (registry ->
/// mirror urls, from `[registries."host"] mirrors`). Blocking; at start.
pub fn load(
    config_path: Option<&Path>,
    listed: &HashMap<String, Vec<String>>,
    make_client: &ClientFactory<'_>,
) -> Result<Mirrors> {
    let mut m = Mirrors::default();
    if let Some(dir) = config_path {
        let entries = std::fs::read_dir(dir).map_err(|e| bad(dir, e))?;
        for e in entries.flatten() {
            let file = e.path().join("hosts.toml");
            if !file.is_file() {
                continue;
            }
            let name = e.file_name().to_string_lossy().to_string();
            let endpoints = read_hosts(&file, make_client)?;
            if name == "_default" {
                m.default = endpoints;
            } else {
                m.by_registry
                    .insert(crate::source::canonical_registry(&name), endpoints);
            }
        }
    }
    for (registry, urls) in listed {
        let mut endpoints = Vec::new();
        for u in urls {
            endpoints.push(endpoint(u, HostEntry::default(), make_client)?);
        }
        m.by_registry
            .entry(crate::source::canonical_registry(registry))
            .or_default()
            .extend(endpoints);
    }
    Ok(m)
}

fn bad(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("registry hosts {}: {e}", path.display()))
}

fn read_hosts(file: &Path, make_client: &ClientFactory<'_>) -> Result<Vec<Endpoint>> {
    let text = crate::config::read_capped_text(file, MAX_HOSTS_FILE).map_err(|e| bad(file, e))?;
    let parsed: HostsFile = toml::from_str(&text).map_err(|e| bad(file, e))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    // File order (toml's `preserve_order`): mirrors are tried in the order written.
    for (url, value) in parsed.host {
        let mut entry: HostEntry = value.try_into().map_err(|e| bad(file, e))?;
        // Relative certificate paths are relative to the hosts.toml's directory.
        let rel = |p: String| -> String {
            let pb = PathBuf::from(&p);
            if pb.is_absolute() {
                p
            } else {
                base.join(pb).display().to_string()
            }
        };
        entry.ca = entry
            .ca
            .map(|c| StringOrList::Many(c.into_vec().into_iter().map(rel).collect()));
        out.push(endpoint(&url, entry, make_client).map_err(|e| bad(file, e.message))?);
    }
    Ok(out)
}

/// A certificate or key file named by a hosts.toml.
fn read_pem(path: &str) -> std::io::Result<Vec<u8>> {
    crate::config::read_capped_file(Path::new(path), crate::config::MAX_SIDE_FILE)
}

fn endpoint(url: &str, entry: HostEntry, make_client: &ClientFactory<'_>) -> Result<Endpoint> {
    let mut u = Url::parse(url).map_err(|e| Error::invalid(format!("mirror {url:?}: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(Error::invalid(format!(
            "mirror {url:?}: expected an http(s)://host[:port] url"
        )));
    }
    let name = match u.port() {
        Some(p) => format!("{}:{p}", u.host_str().unwrap_or_default()),
        None => u.host_str().unwrap_or_default().to_string(),
    };
    let path = u.path().trim_end_matches('/').to_string();
    let path = if entry.override_path {
        path
    } else {
        format!("{path}/v2")
    };
    u.set_path(&format!("{path}/"));
    u.set_query(None);
    let caps = entry
        .capabilities
        .unwrap_or_else(|| vec!["pull".into(), "resolve".into()]);
    let mut certs = Vec::new();
    for ca in entry.ca.map(StringOrList::into_vec).unwrap_or_default() {
        let pem = read_pem(&ca).map_err(|e| Error::invalid(format!("ca {ca}: {e}")))?;
        certs.extend(
            reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::invalid(format!("ca {ca}: {e}")))?,
        );
    }
    let identity = match entry.client {
        None => None,
        Some(c) => {
            let (cert, key) = match c {
                ClientCerts::One(cert) => (cert, None),
                ClientCerts::Pair(mut v) if !v.is_empty() => (v.remove(0), v.pop()),
                ClientCerts::Pairs(mut v) if !v.is_empty() && !v[0].is_empty() => {
                    let mut first = v.remove(0);
                    (first.remove(0), first.pop())
                }
                _ => return Err(Error::invalid(format!("mirror {url}: empty client"))),
            };
            let mut pem =
                read_pem(&cert).map_err(|e| Error::invalid(format!("client {cert}: {e}")))?;
            if let Some(key) = key {
                pem.extend(
                    read_pem(&key).map_err(|e| Error::invalid(format!("client key {key}: {e}")))?,
                );
            }
            Some(
                reqwest::Identity::from_pem(&pem)
                    .map_err(|e| Error::invalid(format!("client {cert}: {e}")))?,
            )
        }
    };
    let mut headers = HeaderMap::new();
    for (k, v) in entry.header {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| Error::invalid(format!("mirror {url}: header {k:?}: {e}")))?;
        for v in v.into_vec() {
            let value = HeaderValue::from_str(&v)
                .map_err(|e| Error::invalid(format!("mirror {url}: header {k:?}: {e}")))?;
            headers.append(name.clone(), value);
        }
    }
    Ok(Endpoint {
        api: u,
        name,
        pull: caps.iter().any(|c| c == "pull"),
        resolve: caps.iter().any(|c| c == "resolve"),
        client: make_client(certs, identity, entry.skip_verify)?,
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(
        _: Vec<reqwest::Certificate>,
        _: Option<reqwest::Identity>,
        _: bool,
    ) -> Result<Client> {
        #[allow(clippy::disallowed_methods)]
        Ok(Client::new())
    }

    #[test]
    // Fixture files, not cache files.
    #[allow(clippy::disallowed_methods)]
    fn hosts_toml_in_containerds_format() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("registry.example:5000");
        std::fs::create_dir(&reg).unwrap();
        std::fs::write(
            reg.join("hosts.toml"),
            r#"server = "https://registry.example:5000"
[host."https://mirror-a.example"]
  capabilities = ["pull"]
  [host."https://mirror-a.example".header]
    x-tenant = "node"
[host."http://mirror-b.example:8080/proxy/v2"]
  override_path = true
"#,
        )
        .unwrap();
        let def = dir.path().join("_default");
        std::fs::create_dir(&def).unwrap();
        std::fs::write(def.join("hosts.toml"), "[host.\"https://any.example\"]\n").unwrap();
        let listed = HashMap::from([(
            "docker.io".to_string(),
            vec!["https://hub-mirror.example".to_string()],
        )]);
        let m = load(Some(dir.path()), &listed, &client).unwrap();
        let eps = m.of("registry.example:5000");
        assert_eq!(eps.len(), 2);
        let a = eps.iter().find(|e| e.name == "mirror-a.example").unwrap();
        assert_eq!(a.api.as_str(), "https://mirror-a.example/v2/");
        assert!(a.pull && !a.resolve);
        assert_eq!(a.headers["x-tenant"], "node");
        let b = eps
            .iter()
            .find(|e| e.name == "mirror-b.example:8080")
            .unwrap();
        assert_eq!(b.api.as_str(), "http://mirror-b.example:8080/proxy/v2/");
        assert!(b.pull && b.resolve);
        assert_eq!(m.of("other.example")[0].name, "any.example");
        assert_eq!(
            m.of("docker.io")[0].api.as_str(),
            "https://hub-mirror.example/v2/"
        );
    }

    #[test]
    fn a_bad_mirror_url_is_an_error() {
        let listed = HashMap::from([("r".to_string(), vec!["ftp://x".to_string()])]);
        assert!(load(None, &listed, &client).is_err());
    }
}
