//! The index: which module each source location resolved to, persisted in `cache_dir`
//! (`index.json`) so a restarted daemon serves cache hits without the network.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::store::Store;

/// Name of the index file under `cache_dir`.
const INDEX_FILE: &str = "index.json";

/// What one location (a url, or an OCI reference with its tag/digest) resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The exact location, e.g. `oci://reg/repo:tag`; the index key.
    pub location: String,
    /// The source the bytes came from (`oci://reg/repo`, the http url, `file://path`).
    pub source: String,
    /// sha256 of the module bytes; the blob's name in the store.
    pub module: Digest,
    /// Module size in bytes.
    pub size: u64,
    /// OCI: digest of the image manifest the module came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<Digest>,
    /// OCI: digest of the image index the manifest was picked from, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<Digest>,
    /// http(s): the server's `ETag`, sent as `If-None-Match` when re-checking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// When the module was downloaded (unix seconds).
    pub fetched_at: u64,
    /// When the location was last checked upstream (unix seconds).
    pub resolved_at: u64,
    /// Per plugin resource name, the resource version this location was last resolved for
    /// (drives `Always`).
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
}

impl Record {
    /// The digest the location itself points at: the index when there is one, else the
    /// manifest, else (http/file) the module.
    pub fn top_digest(&self) -> Digest {
        self.index_digest
            .or(self.image_digest)
            .unwrap_or(self.module)
    }

    /// True when `d` names this record's module, manifest or index.
    pub fn answers_to(&self, d: &Digest) -> bool {
        self.module == *d || self.image_digest == Some(*d) || self.index_digest == Some(*d)
    }
}

/// Who may read what a source (an OCI repository) holds, as the registry confirmed it.
/// Credentials appear only as ids (HMACs under the node key), never in clear.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Access {
    /// The registry served this source anonymously: anyone may have its modules.
    #[serde(default)]
    pub public: bool,
    /// Credential ids the registry accepted for this source, with when (unix milliseconds).
    #[serde(default)]
    pub verified: BTreeMap<String, u64>,
}

/// What the registry confirmed for a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Anonymous access works: the source is public.
    Public,
    /// This credential id was accepted.
    Credential(String),
}

/// The on-disk form of the index.
#[derive(Debug, Default, Serialize, Deserialize)]
struct IndexFile {
    /// Format version, for future migrations.
    version: u32,
    /// All records.
    records: Vec<Record>,
    /// Access per source key.
    #[serde(default)]
    access: BTreeMap<String, Access>,
    /// When each module was last served (unix milliseconds).
    #[serde(default)]
    used: BTreeMap<Digest, u64>,
}

/// Everything the index holds, behind one lock.
#[derive(Debug, Default)]
struct State {
    /// Records by location.
    records: BTreeMap<String, Record>,
    /// Access by source key.
    access: BTreeMap<String, Access>,
    /// When each module was last served (unix ms); written to disk with the next persist.
    used: BTreeMap<Digest, u64>,
}

/// One cached module, as `wasm-cache ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleInfo {
    /// sha256 of the module bytes.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Locations (urls) that map to it.
    pub locations: Vec<String>,
    /// When it was last served (unix ms), if ever since it was cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<u64>,
    /// When it was first downloaded (unix seconds).
    pub pulled_at: u64,
    /// True when some source it comes from may be read by anyone.
    pub public: bool,
}

/// The index in memory, written through to disk on every change.
#[derive(Debug, Clone)]
pub struct Index {
    /// Where the file is persisted.
    store: Store,
    /// Records and access.
    state: Arc<Mutex<State>>,
    /// Serialises writes of the file so an older snapshot never overwrites a newer one.
    write_lock: Arc<tokio::sync::Mutex<()>>,
}

/// Milliseconds since the unix epoch.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Index {
    /// Loads the index, dropping records whose blob is missing. Blocking.
    pub fn load(store: &Store) -> Result<Index> {
        let mut records = BTreeMap::new();
        let mut access = BTreeMap::new();
        let mut used = BTreeMap::new();
        let mut dropped = 0;
        if let Some(bytes) = store.read_meta(INDEX_FILE)? {
            match serde_json::from_slice::<IndexFile>(&bytes) {
                Ok(file) => {
                    access = file.access;
                    used = file.used;
                    for r in file.records {
                        if store.has(&r.module) {
                            records.insert(r.location.clone(), r);
                        } else {
                            dropped += 1;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cache index is unreadable; starting with an empty index");
                }
            }
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "dropped index records whose module blob is missing"
            );
        }
        let index = Index {
            store: store.clone(),
            state: Arc::new(Mutex::new(State {
                records,
                access,
                used,
            })),
            write_lock: Arc::new(tokio::sync::Mutex::new(())),
        };
        if dropped > 0 {
            index.write_now()?;
        }
        // Blobs no record points to (a crash between a purge's index write and its deletes).
        let referenced: std::collections::HashSet<Digest> =
            index.lock().records.values().map(|r| r.module).collect();
        let mut orphans = 0;
        for d in store.blob_digests()? {
            if !referenced.contains(&d) {
                store.remove(&d)?;
                orphans += 1;
            }
        }
        if orphans > 0 {
            tracing::info!(orphans, "removed blobs that no record points to");
        }
        Ok(index)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record for `location`.
    pub fn get(&self, location: &str) -> Option<Record> {
        self.lock().records.get(location).cloned()
    }

    /// What the registry confirmed about access to `source`.
    pub fn access(&self, source: &str) -> Access {
        self.lock().access.get(source).cloned().unwrap_or_default()
    }

    /// Records a grant for `source` (no write to disk; see [`Index::persist`]).
    pub fn grant(&self, source: &str, grant: &Grant) {
        let mut st = self.lock();
        let a = st.access.entry(source.to_string()).or_default();
        match grant {
            Grant::Public => a.public = true,
            Grant::Credential(id) => {
                a.verified.insert(id.clone(), now_millis());
            }
        }
    }

    /// Forgets that `ids` were accepted for `source` (the registry refused them).
    pub fn revoke(&self, source: &str, ids: &[String]) -> bool {
        let mut st = self.lock();
        let Some(a) = st.access.get_mut(source) else {
            return false;
        };
        let before = a.verified.len();
        a.verified.retain(|k, _| !ids.contains(k));
        a.verified.len() != before
    }

    /// `None` when no record serves `module`; else whether some record serving it comes
    /// from a source anyone may read (a public OCI repository, or an http/file url). One pass.
    pub fn module_public(&self, module: &Digest) -> Option<bool> {
        let st = self.lock();
        let mut found = None;
        for r in st.records.values().filter(|r| r.module == *module) {
            let public = !r.source.starts_with("oci://")
                || st.access.get(&r.source).is_some_and(|a| a.public);
            if public {
                return Some(true);
            }
            found = Some(false);
        }
        found
    }

    /// The newest time credential `id` was accepted for a source holding `module`.
    pub fn credential_verified_for_module(&self, module: &Digest, id: &str) -> Option<u64> {
        let st = self.lock();
        st.records
            .values()
            .filter(|r| r.module == *module)
            .filter_map(|r| st.access.get(&r.source)?.verified.get(id).copied())
            .max()
    }

    /// Notes that `module` was served now (kept in memory until the next persist).
    pub fn touch(&self, module: &Digest) {
        self.lock().used.insert(*module, now_millis());
    }

    /// Every cached module with what maps to it, ordered by digest.
    pub fn modules(&self) -> Vec<ModuleInfo> {
        let st = self.lock();
        let mut by: BTreeMap<Digest, ModuleInfo> = BTreeMap::new();
        for r in st.records.values() {
            let public = !r.source.starts_with("oci://")
                || st.access.get(&r.source).is_some_and(|a| a.public);
            let e = by.entry(r.module).or_insert_with(|| ModuleInfo {
                digest: r.module,
                size: r.size,
                locations: Vec::new(),
                last_used: st.used.get(&r.module).copied(),
                pulled_at: r.fetched_at,
                public: false,
            });
            e.locations.push(r.location.clone());
            e.pulled_at = e.pulled_at.min(r.fetched_at);
            e.public |= public;
        }
        by.into_values().collect()
    }

    /// Removes every record of the modules in `digests` and their use times; returns the
    /// records removed. Persist afterwards.
    pub fn remove_modules(&self, digests: &[Digest]) -> Vec<Record> {
        let mut st = self.lock();
        let mut removed = Vec::new();
        st.records.retain(|_, r| {
            if digests.contains(&r.module) {
                removed.push(r.clone());
                false
            } else {
                true
            }
        });
        for d in digests {
            st.used.remove(d);
        }
        removed
    }

    /// Forgets credential verifications made before `before_ms` (they no longer count).
    pub fn prune_verified(&self, before_ms: u64) -> usize {
        let mut st = self.lock();
        let mut n = 0;
        for a in st.access.values_mut() {
            let len = a.verified.len();
            a.verified.retain(|_, at| *at >= before_ms);
            n += len - a.verified.len();
        }
        n
    }

    /// All records (a snapshot).
    pub fn records(&self) -> Vec<Record> {
        self.lock().records.values().cloned().collect()
    }

    /// A record of `source` whose module, manifest or index digest is every one of `digests`.
    pub fn find_by_digests(&self, source: &str, digests: &[Digest]) -> Option<Record> {
        self.lock()
            .records
            .values()
            .find(|r| r.source == source && digests.iter().all(|d| r.answers_to(d)))
            .cloned()
    }

    /// True when `source` already produced the module `module` (so its bytes may be reused
    /// for that source without downloading them again).
    pub fn source_has_module(&self, source: &str, module: &Digest) -> bool {
        self.lock()
            .records
            .values()
            .any(|r| r.source == source && r.module == *module)
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// True when there are no records.
    pub fn is_empty(&self) -> bool {
        self.lock().records.is_empty()
    }

    /// Inserts or replaces a record and persists the index.
    pub async fn put(&self, record: Record) -> Result<()> {
        self.lock().records.insert(record.location.clone(), record);
        self.persist().await
    }

    /// Writes the current records to disk (atomically).
    pub async fn persist(&self) -> Result<()> {
        let _guard = self.write_lock.lock().await;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.write_now())
            .await
            .map_err(|e| Error::internal("writing index", e))?
    }

    fn write_now(&self) -> Result<()> {
        let file = {
            let st = self.lock();
            IndexFile {
                version: 1,
                records: st.records.values().cloned().collect(),
                access: st.access.clone(),
                used: st.used.clone(),
            }
        };
        let bytes =
            serde_json::to_vec_pretty(&file).map_err(|e| Error::internal("encoding index", e))?;
        self.store.write_meta(INDEX_FILE, &bytes, 0o640)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(location: &str, module: Digest) -> Record {
        Record {
            location: location.into(),
            source: "oci://r/x".into(),
            module,
            size: 1,
            image_digest: Some(Digest::of(b"manifest")),
            index_digest: None,
            etag: None,
            fetched_at: 1,
            resolved_at: 1,
            versions: BTreeMap::new(),
        }
    }

    #[test]
    fn prunes_only_old_verifications() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let index = Index::load(&store).unwrap();
        index.grant("oci://r/x", &Grant::Credential("old".into()));
        let cutoff = now_millis() + 1;
        index.grant("oci://r/x", &Grant::Public);
        assert_eq!(index.prune_verified(cutoff), 1);
        assert!(index.access("oci://r/x").verified.is_empty());
        assert!(
            index.access("oci://r/x").public,
            "public access is not a verification"
        );
        index.grant("oci://r/x", &Grant::Credential("new".into()));
        assert_eq!(index.prune_verified(cutoff - 1000), 0);
    }

    #[tokio::test]
    async fn persists_and_drops_records_without_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let kept = Digest::of(b"kept");
        let index = Index::load(&store).unwrap();
        let mut w = store.writer(100, "m").unwrap();
        w.write(b"kept").await.unwrap();
        let (tmp, d, _) = w.finish().await.unwrap();
        store.commit(tmp, &d).unwrap();
        index.put(record("oci://r/x:a", kept)).await.unwrap();
        index
            .put(record("oci://r/x:b", Digest::of(b"gone")))
            .await
            .unwrap();
        assert_eq!(index.len(), 2);

        // A blob no record points to is removed at load.
        let mut w = store.writer(100, "m").unwrap();
        w.write(b"orphan").await.unwrap();
        let (tmp, orphan, _) = w.finish().await.unwrap();
        store.commit(tmp, &orphan).unwrap();

        let reloaded = Index::load(&store).unwrap();
        assert_eq!(reloaded.len(), 1);
        assert!(!store.has(&orphan));
        assert!(store.has(&kept));
        assert_eq!(reloaded.get("oci://r/x:a").unwrap().module, kept);
        assert!(
            reloaded
                .find_by_digests("oci://r/x", &[Digest::of(b"manifest")])
                .is_some()
        );
        assert!(
            reloaded
                .find_by_digests("oci://other/x", &[Digest::of(b"manifest")])
                .is_none()
        );
    }
}
