//! Pre-warming: the modules that WasmPlugin manifests (or plain urls) name, fetched before a
//! proxy asks. Used by `wasm-cache prefetch` (through the daemon's socket) and by the daemon
//! itself at start and on `SIGHUP` (`[prefetch] urls` and `wasmplugin_dirs`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::api::FetchBody;
use crate::auth::Secret;

/// Largest manifest file read.
pub const MAX_FILE: u64 = crate::config::MAX_SIDE_FILE;
/// Most files read from one directory.
pub const MAX_FILES: usize = 10_000;

/// One module to warm.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Item {
    /// The url.
    pub url: String,
    /// `spec.sha256`.
    pub sha256: Option<String>,
    /// `spec.imagePullPolicy`.
    pub policy: Option<String>,
    /// `spec.imagePullSecret`: the name of the secret the plugin pulls with.
    pub secret: Option<String>,
    /// `namespace/name` of the WasmPlugin, when it came from one.
    pub name: Option<String>,
}

impl Item {
    /// A bare url.
    pub fn url(url: &str) -> Item {
        Item {
            url: url.to_string(),
            sha256: None,
            policy: None,
            secret: None,
            name: None,
        }
    }

    /// The fetch request for it, with `secret` when the plugin names a pull secret.
    pub fn body(&self, secret: Option<&Secret>) -> FetchBody {
        FetchBody {
            url: self.url.clone(),
            sha256: self.sha256.clone(),
            pull_policy: self.policy.clone(),
            pull_secret: self.secret.as_ref().and(secret).cloned(),
            resource_name: self.name.clone(),
            resource_version: None,
            plugin_name: self
                .name
                .as_deref()
                .map(|n| n.rsplit('/').next().unwrap_or(n).to_string()),
        }
    }
}

/// A Kubernetes object as far as warming reads it (unknown fields are ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Object {
    /// `WasmPlugin`, or `List` with `items`.
    kind: Option<String>,
    /// Name and namespace.
    metadata: Metadata,
    /// The WasmPlugin spec.
    spec: Option<Spec>,
    /// The objects of a `List`.
    items: Vec<Object>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Spec {
    url: Option<String>,
    sha256: Option<String>,
    image_pull_policy: Option<String>,
    image_pull_secret: Option<String>,
}

/// The modules of every WasmPlugin in `text` (multi-document YAML or JSON; `List`s are
/// opened; other kinds are skipped).
pub fn parse(text: &str) -> Result<Vec<Item>, String> {
    let docs: Vec<Object> = serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut stack: Vec<Object> = docs.into_iter().rev().collect();
    while let Some(o) = stack.pop() {
        match o.kind.as_deref() {
            Some("List") | Some("WasmPluginList") => stack.extend(o.items.into_iter().rev()),
            Some("WasmPlugin") => {
                let Some(spec) = o.spec else { continue };
                let Some(url) = spec.url.filter(|u| !u.trim().is_empty()) else {
                    return Err(format!(
                        "WasmPlugin {} has no spec.url",
                        o.metadata.name.unwrap_or_default()
                    ));
                };
                let name = o.metadata.name.map(|n| match o.metadata.namespace {
                    Some(ns) => format!("{ns}/{n}"),
                    None => n,
                });
                out.push(Item {
                    url,
                    sha256: spec.sha256.filter(|s| !s.is_empty()),
                    policy: spec.image_pull_policy.filter(|s| !s.is_empty()),
                    secret: spec.image_pull_secret.filter(|s| !s.is_empty()),
                    name,
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Reads `path` (at most [`MAX_FILE`] bytes) and parses it.
pub fn read_file(path: &Path) -> Result<Vec<Item>, String> {
    let text = crate::config::read_capped_text(path, MAX_FILE)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The modules of the `*.yaml`, `*.yml` and `*.json` files in `dirs` (not recursive), and
/// what could not be read. Blocking.
pub fn read_dirs(dirs: &[PathBuf]) -> (BTreeSet<Item>, Vec<String>) {
    let mut items = BTreeSet::new();
    let mut errors = Vec::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push(format!("{}: {e}", dir.display()));
                continue;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
            })
            .take(MAX_FILES)
            .collect();
        files.sort();
        for f in files {
            match read_file(&f) {
                Ok(found) => items.extend(found),
                Err(e) => errors.push(e),
            }
        }
    }
    (items, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wasmplugins_are_read_from_multi_document_yaml_and_lists() {
        let text = r#"
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: acl, namespace: mesh}
spec:
  url: oci://ghcr.io/acme/acl:1.2
  sha256: abc
  imagePullPolicy: Always
  imagePullSecret: pull
  pluginConfig: {a: 1}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: other}
---
---
kind: List
items:
- kind: WasmPlugin
  metadata: {name: b}
  spec: {url: "https://x.example/b.wasm"}
"#;
        let items = parse(text).unwrap();
        assert_eq!(
            items,
            vec![
                Item {
                    url: "oci://ghcr.io/acme/acl:1.2".into(),
                    sha256: Some("abc".into()),
                    policy: Some("Always".into()),
                    secret: Some("pull".into()),
                    name: Some("mesh/acl".into()),
                },
                Item {
                    name: Some("b".into()),
                    ..Item::url("https://x.example/b.wasm")
                },
            ]
        );
        let body = items[0].body(Some(&Secret::new("{}")));
        assert_eq!(body.pull_secret.unwrap().expose(), "{}");
        assert_eq!(body.plugin_name.as_deref(), Some("acl"));
        assert!(
            items[1]
                .body(Some(&Secret::new("{}")))
                .pull_secret
                .is_none()
        );
    }

    #[test]
    fn a_wasmplugin_without_url_or_bad_yaml_is_an_error() {
        assert!(
            parse("kind: WasmPlugin\nspec: {sha256: x}\n")
                .unwrap_err()
                .contains("spec.url")
        );
        assert!(parse("kind: [unclosed\n").is_err());
    }

    #[test]
    fn an_alias_bomb_is_refused_not_expanded() {
        let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..20 {
            let prev = if i == 0 {
                "a".to_string()
            } else {
                format!("a{}", i - 1)
            };
            text.push_str(&format!("a{i}: &a{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        text.push_str("kind: WasmPlugin\n");
        // Refused by the parser's budget (not by a later check on an expanded document).
        let e = parse(&text).unwrap_err();
        assert!(e.contains("budget"), "{e}");
    }
}

/// What became of one module.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Warmed {
    /// Downloaded now.
    Fetched,
    /// It was cached already.
    Cached,
    /// It could not be fetched.
    Failed,
}

impl Warmed {
    /// The word shown in progress lines and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Warmed::Fetched => "fetched",
            Warmed::Cached => "cached",
            Warmed::Failed => "failed",
        }
    }
}

/// How warming one module ended.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// The url.
    pub url: String,
    /// `namespace/name` of its WasmPlugin, when it came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What became of it.
    pub result: Warmed,
    /// The module digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The error code, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The error message, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Outcome {
    /// The outcome of fetching `item`.
    pub fn of(
        item: &Item,
        r: Result<(crate::digest::Digest, crate::api::CacheStatus), crate::error::Error>,
    ) -> Outcome {
        use crate::api::CacheStatus;
        let (result, digest, code, message) = match r {
            Ok((d, CacheStatus::Miss)) => (Warmed::Fetched, Some(d.to_string()), None, None),
            Ok((d, _)) => (Warmed::Cached, Some(d.to_string()), None, None),
            Err(e) => (
                Warmed::Failed,
                None,
                Some(e.code.as_str().to_string()),
                Some(e.message),
            ),
        };
        Outcome {
            url: item.url.clone(),
            name: item.name.clone(),
            result,
            digest,
            code,
            message,
        }
    }

    /// One progress line.
    pub fn line(&self) -> String {
        let what = match &self.name {
            Some(n) => format!("{} ({n})", self.url),
            None => self.url.clone(),
        };
        let result = self.result.as_str();
        match (&self.digest, &self.code) {
            (Some(d), _) => format!("{result:<8} {what} {d}"),
            (None, Some(c)) => format!(
                "{result:<8} {what} {c}: {}",
                self.message.as_deref().unwrap_or_default()
            ),
            _ => format!("{result:<8} {what}"),
        }
    }
}

/// What a prefetch did.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// One entry per module, in the order they finished.
    pub modules: Vec<Outcome>,
    /// Modules downloaded now.
    pub fetched: usize,
    /// Modules that were cached already.
    pub cached: usize,
    /// Modules that could not be fetched.
    pub failed: usize,
}

impl Report {
    /// Adds an outcome.
    pub fn add(&mut self, o: Outcome) {
        match o.result {
            Warmed::Fetched => self.fetched += 1,
            Warmed::Cached => self.cached += 1,
            Warmed::Failed => self.failed += 1,
        }
        self.modules.push(o);
    }

    /// The summary line.
    pub fn summary(&self) -> String {
        format!(
            "{} modules: {} fetched, {} already cached, {} failed",
            self.modules.len(),
            self.fetched,
            self.cached,
            self.failed
        )
    }
}

/// Fetches `items` through the daemon on `socket`, `concurrency` at a time, calling
/// `progress` as each finishes.
pub async fn through_socket(
    socket: &Path,
    items: Vec<Item>,
    secret: Option<Secret>,
    concurrency: usize,
    mut progress: impl FnMut(&Outcome),
) -> Report {
    use futures_util::StreamExt;
    let mut report = Report::default();
    let mut done = futures_util::stream::iter(items.into_iter().map(|item| {
        let body = item.body(secret.as_ref());
        async move {
            let r = crate::client::fetch(socket, &body, None)
                .await
                .and_then(|out| match out {
                    crate::client::FetchOutput::Answer(a) => Ok((a.digest, a.cache)),
                    crate::client::FetchOutput::Written(_) => Err(crate::error::Error::internal(
                        "prefetch",
                        "unexpected module body",
                    )),
                });
            Outcome::of(&item, r)
        }
    }))
    .buffer_unordered(concurrency.max(1));
    while let Some(o) = done.next().await {
        progress(&o);
        report.add(o);
    }
    report
}

/// Fetches `items` with the daemon's own service, `concurrency` at a time, logging each.
pub async fn warm(
    service: &crate::service::Service,
    items: Vec<Item>,
    concurrency: usize,
) -> Report {
    use futures_util::StreamExt;
    let mut report = Report::default();
    let mut done = futures_util::stream::iter(items.into_iter().map(|item| async move {
        let r = match crate::service::FetchRequest::from_body(item.body(None), service.limits()) {
            Ok(req) => service.fetch(req).await.map(|o| (o.record.module, o.cache)),
            Err(e) => Err(e),
        };
        Outcome::of(&item, r)
    }))
    .buffer_unordered(concurrency.max(1));
    while let Some(o) = done.next().await {
        match &o.code {
            None => {
                tracing::info!(url = %crate::source::redact(&o.url), result = o.result.as_str(), "prefetch")
            }
            Some(code) => tracing::warn!(
                url = %crate::source::redact(&o.url),
                code = %code,
                error = o.message.as_deref().unwrap_or_default(),
                "prefetch failed"
            ),
        }
        report.add(o);
    }
    report
}
