//! The index: which module each location resolved to, who may read each source, and when
//! each module was last served.
//!
//! Reads are served from memory (hits and module GETs never touch the disk). Every change
//! goes through one of the methods below, which change memory under one lock and then write
//! only the rows that changed to `cache_dir/index.redb` in one ACID transaction (redb:
//! copy-on-write B-trees, fsynced on commit), so the cost of a change does not grow with the
//! number of entries and a crash leaves the old state or the new one. A transaction writes
//! the *current* in-memory value of each row it covers, so two changes that race can never
//! leave disk older than memory.
//!
//! An `index.json` left by an earlier version is imported on first start and renamed to
//! `index.json.migrated`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::store::Store;
use crate::api::ModuleInfo;
use crate::digest::Digest;
use crate::error::{Error, Result};

/// The database file under `cache_dir`.
const DB_FILE: &str = "index.redb";
/// The single-file index of versions before the database, migrated on first start.
const LEGACY_FILE: &str = "index.json";
/// Largest `index.json` read for migration (it is read whole).
const MAX_LEGACY_FILE: u64 = 512 << 20;

/// Location -> JSON [`Record`].
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// Source key -> JSON [`Access`].
const ACCESS: TableDefinition<&str, &[u8]> = TableDefinition::new("access");
/// Module digest -> when it was last served (unix ms).
const USED: TableDefinition<&str, u64> = TableDefinition::new("used");

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
    /// When the module was downloaded (unix ms).
    pub fetched_at: u64,
    /// When the location was last checked upstream (unix ms).
    pub resolved_at: u64,
    /// Per plugin resource name, the resource version this location was last resolved for
    /// (drives `Always`).
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
    /// The signature check a policy made, when one applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<SignatureCheck>,
    /// Set on what the registry endpoint stores (a manifest, tag, config or layer exactly as
    /// the upstream served it): such a record is never a module to `POST /v1/fetch` or
    /// `GET /v1/modules/...`, but counts in the cache's size, expiry and purges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawObject>,
}

/// An OCI object the registry endpoint serves from the cache, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawObject {
    /// The `Content-Type` the upstream served it with.
    pub media_type: String,
    /// A manifest (or index), as opposed to a blob.
    #[serde(default)]
    pub manifest: bool,
    /// Manifests: the blobs (config and layers) and child manifests it references, which
    /// the endpoint may serve from this repository.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refs: Vec<Digest>,
    /// Manifests: the layer of a "compat" image, which must hold a valid `plugin.wasm`
    /// before it is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compat_layer: Option<Digest>,
    /// In the endpoint's default scope: a Wasm artifact, a compat image, an index leading to
    /// one, or a blob one of those references.
    #[serde(default)]
    pub wasm: bool,
}

/// What a signature policy found for a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureCheck {
    /// The policy's key set at the time (a record checked under another key set is checked
    /// again before it is served).
    pub keyset: String,
    /// The id of the key that verified it; `None`: unsigned, served under `warn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
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

    /// True when the source is an OCI repository (whose access is checked per caller).
    pub fn is_oci(&self) -> bool {
        self.source.starts_with("oci://")
    }
}

/// Who may read what a source (an OCI repository) holds, as the registry confirmed it.
/// Credentials appear only as ids (HMACs under the node key), never in clear. "Public" is a
/// verification like the others: it lapses under `[auth] verify` and is checked again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Access {
    /// When the registry last served this source anonymously (unix ms).
    #[serde(default)]
    pub public_at: Option<u64>,
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

/// Everything the index holds, behind one lock.
#[derive(Debug, Default)]
struct State {
    /// Records by location.
    records: BTreeMap<String, Record>,
    /// Access by source key.
    access: BTreeMap<String, Access>,
    /// When each module was last served (unix ms).
    used: BTreeMap<Digest, u64>,
    /// Modules whose use time changed since it was last written.
    used_dirty: BTreeSet<Digest>,
    /// Locations by module digest: a hit or a module GET looks up only its module's records.
    by_module: BTreeMap<Digest, BTreeSet<String>>,
    /// Locations by source key: a digest lookup looks only at its source's records.
    by_source: BTreeMap<String, BTreeSet<String>>,
}

impl State {
    /// Inserts or replaces the record of its location, keeping the lookups in step.
    fn put(&mut self, r: Record) {
        let loc = r.location.clone();
        self.take(&loc);
        self.by_module
            .entry(r.module)
            .or_default()
            .insert(loc.clone());
        self.by_source
            .entry(r.source.clone())
            .or_default()
            .insert(loc.clone());
        self.records.insert(loc, r);
    }

    /// Removes the record of `loc`, keeping the lookups in step.
    fn take(&mut self, loc: &str) -> Option<Record> {
        let old = self.records.remove(loc)?;
        unlink(&mut self.by_module, &old.module, loc);
        unlink(&mut self.by_source, &old.source, loc);
        Some(old)
    }

    /// The module records that serve `module` (the registry endpoint's are not modules).
    fn of_module(&self, module: &Digest) -> impl Iterator<Item = &Record> {
        self.by_module
            .get(module)
            .into_iter()
            .flatten()
            .filter_map(|loc| self.records.get(loc))
            .filter(|r| r.raw.is_none())
    }

    /// The module records that come from `source`.
    fn of_source(&self, source: &str) -> impl Iterator<Item = &Record> {
        self.raw_of_source(source).filter(|r| r.raw.is_none())
    }

    /// Every record that comes from `source`, the registry endpoint's included.
    fn raw_of_source(&self, source: &str) -> impl Iterator<Item = &Record> {
        self.by_source
            .get(source)
            .into_iter()
            .flatten()
            .filter_map(|loc| self.records.get(loc))
    }
}

/// Removes `loc` from the set under `key`, and the set once empty.
fn unlink<K: Ord + std::borrow::Borrow<Q>, Q: Ord + ?Sized>(
    map: &mut BTreeMap<K, BTreeSet<String>>,
    key: &Q,
    loc: &str,
) {
    if let Some(set) = map.get_mut(key) {
        set.remove(loc);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

/// How a module may be read, from every record that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleAccess {
    /// Some record comes from an http(s) or file url: anyone may read it.
    pub open: bool,
    /// The newest time a registry served one of its OCI sources anonymously (unix ms).
    pub public_at: Option<u64>,
    /// An OCI source and manifest digest to check anonymous access with.
    pub oci: Option<(String, Digest)>,
}

/// The rows one change touched; the transaction writes their current values.
#[derive(Debug, Default)]
struct Rows {
    /// Record locations.
    records: Vec<String>,
    /// Access source keys.
    access: Vec<String>,
}

/// The index: memory for reads, redb for durability. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Index {
    /// Records, access and use times.
    state: Arc<RwLock<State>>,
    /// The database; its write transactions are serialised by redb itself.
    db: Arc<Database>,
    /// Where a damaged database found at this start was kept aside.
    damaged: Option<std::path::PathBuf>,
}

/// Prefix of a damaged database kept aside (`index.redb.damaged-<unix ms>`). While one is
/// present, blobs no record points to are kept: they may be all that is left of the cache.
const DAMAGED_PREFIX: &str = "index.redb.damaged-";

/// Milliseconds since the unix epoch.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn db_err(e: impl Into<redb::Error>) -> Error {
    match e.into() {
        redb::Error::Io(io) => Error::io("cache index database", io),
        e => Error::internal("cache index database", e),
    }
}

/// Writes `value` as JSON under `key`, or removes the key when there is none.
fn put_json<T: Serialize>(
    table: &mut redb::Table<&str, &[u8]>,
    key: &str,
    value: Option<&T>,
) -> Result<()> {
    match value {
        Some(v) => {
            let json = serde_json::to_vec(v).map_err(|e| Error::internal("encoding", e))?;
            table.insert(key, json.as_slice()).map_err(db_err)?;
        }
        None => {
            table.remove(key).map_err(db_err)?;
        }
    }
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::internal(&format!("decoding index {what} {key:?}"), e))
}

/// The index file of earlier versions (times in unix seconds).
#[derive(Debug, Deserialize)]
struct LegacyFile {
    /// All records.
    #[serde(default)]
    records: Vec<Record>,
    /// Access per source key.
    #[serde(default)]
    access: BTreeMap<String, LegacyAccess>,
    /// When each module was last served (unix milliseconds).
    #[serde(default)]
    used: BTreeMap<Digest, u64>,
}

/// Access as `index.json` kept it: "public" for good.
#[derive(Debug, Deserialize)]
struct LegacyAccess {
    /// Served anonymously once.
    #[serde(default)]
    public: bool,
    /// Credential ids and when they were accepted (unix ms).
    #[serde(default)]
    verified: BTreeMap<String, u64>,
}

impl Index {
    /// Opens (creating or migrating) the index of `store`, drops records whose blob is
    /// missing and removes blobs no record points to. Blocking.
    ///
    /// A database that cannot be opened is an error: the daemon does not start, and no blob
    /// is touched (a damaged index must never cost the cache).
    pub fn open(store: &Store) -> Result<Index> {
        let path = store.root().join(DB_FILE);
        let opened = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Err(Error::internal(
                &format!("opening {}", path.display()),
                "another wasm-cache process is using this cache_dir",
            )),
            e => Ok(e),
        });
        let (db, damaged) = match opened {
            Ok(db) => (db, None),
            Err(Err(in_use)) => return Err(in_use),
            Err(Ok(e)) => {
                // Damaged: kept aside for inspection, never used to decide what to delete.
                let aside = format!("{DAMAGED_PREFIX}{}", now_millis());
                store.rename_meta(DB_FILE, &aside)?;
                tracing::error!(
                    error = %e,
                    kept_as = %store.root().join(&aside).display(),
                    "the cache index is damaged; starting with an empty index and keeping every blob"
                );
                (
                    Database::create(&path).map_err(db_err)?,
                    Some(store.root().join(aside)),
                )
            }
        };
        let index = Index {
            state: Arc::new(RwLock::new(State::default())),
            db: Arc::new(db),
            damaged,
        };
        index.create_tables()?;
        index.migrate_legacy(store)?;
        index.load()?;
        index.drop_missing(store)?;
        Ok(index)
    }

    /// Where a damaged database found at this start was kept aside, if one was.
    pub fn damaged(&self) -> Option<&std::path::Path> {
        self.damaged.as_deref()
    }

    fn create_tables(&self) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(RECORDS).map_err(db_err)?;
        tx.open_table(ACCESS).map_err(db_err)?;
        tx.open_table(USED).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Imports `index.json` (earlier versions) in one transaction, then renames it.
    fn migrate_legacy(&self, store: &Store) -> Result<()> {
        let Some(len) = store.meta_len(LEGACY_FILE)? else {
            return Ok(());
        };
        // Kept aside under the damaged prefix when it cannot be read: the blobs it described
        // are then kept too (see `drop_missing`), never swept as orphans.
        let keep_aside = |why: &str| -> Result<()> {
            let aside = format!("{DAMAGED_PREFIX}{}.{LEGACY_FILE}", now_millis());
            store.rename_meta(LEGACY_FILE, &aside)?;
            tracing::error!(kept_as = %aside, "index.json from an earlier version {why}; not migrated, every blob kept");
            Ok(())
        };
        if len > MAX_LEGACY_FILE {
            return keep_aside("is larger than 512 MiB");
        }
        let Some(bytes) = store.read_meta(LEGACY_FILE)? else {
            return Ok(());
        };
        let file: LegacyFile = match serde_json::from_slice(&bytes) {
            Ok(f) => f,
            Err(e) => return keep_aside(&format!("is unreadable ({e})")),
        };
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut records = tx.open_table(RECORDS).map_err(db_err)?;
            for mut r in file.records.iter().cloned() {
                // index.json kept seconds; the database keeps milliseconds.
                r.fetched_at = r.fetched_at.saturating_mul(1000);
                r.resolved_at = r.resolved_at.saturating_mul(1000);
                put_json(&mut records, &r.location, Some(&r))?;
            }
            let mut access = tx.open_table(ACCESS).map_err(db_err)?;
            for (k, old) in &file.access {
                // A migrated "public" counts from now and lapses like any verification.
                let a = Access {
                    public_at: old.public.then(now_millis),
                    verified: old.verified.clone(),
                };
                put_json(&mut access, k, Some(&a))?;
            }
            let mut used = tx.open_table(USED).map_err(db_err)?;
            for (d, at) in &file.used {
                used.insert(d.to_string().as_str(), *at).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
        store.rename_meta(LEGACY_FILE, &format!("{LEGACY_FILE}.migrated"))?;
        tracing::info!(
            records = file.records.len(),
            "migrated index.json into the index database"
        );
        Ok(())
    }

    fn load(&self) -> Result<()> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let mut st = State::default();
        for row in tx
            .open_table(RECORDS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            let r: Record = decode("record", k.value(), v.value())?;
            st.put(r);
        }
        for row in tx
            .open_table(ACCESS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            st.access.insert(
                k.value().to_string(),
                decode("access", k.value(), v.value())?,
            );
        }
        for row in tx
            .open_table(USED)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            if let Ok(d) = k.value().parse::<Digest>() {
                st.used.insert(d, v.value());
            }
        }
        *self.lock() = st;
        Ok(())
    }

    /// Drops records whose blob is gone and deletes blobs no record points to (a crash
    /// between a purge's index write and its deletes). Blocking.
    fn drop_missing(&self, store: &Store) -> Result<()> {
        let missing: Vec<Digest> = {
            let st = self.read();
            let set: BTreeSet<Digest> = st
                .records
                .values()
                .map(|r| r.module)
                .filter(|d| !store.has(d))
                .collect();
            set.into_iter().collect()
        };
        if !missing.is_empty() {
            let rows = self.remove_modules_in_memory(&missing);
            tracing::warn!(
                dropped = rows.records.len(),
                "dropped index records whose module blob is missing"
            );
            self.write(rows)?;
        }
        if store.has_meta_prefixed(DAMAGED_PREFIX)? {
            tracing::warn!(
                "a damaged index is kept in the cache dir; blobs no record points to are kept until it is removed"
            );
            return Ok(());
        }
        let referenced: BTreeSet<Digest> = self.read().records.values().map(|r| r.module).collect();
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
        Ok(())
    }

    /// The state, for a change.
    fn lock(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, for a lookup (lookups, such as every cache hit's, run side by side).
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the current in-memory values of `rows` (and use times not yet written) in one
    /// transaction. Blocking.
    fn write(&self, rows: Rows) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        // Read memory only now, holding the database's writer lock: a later change's write
        // starts after this commit and carries anything newer.
        {
            let mut records = tx.open_table(RECORDS).map_err(db_err)?;
            let mut access = tx.open_table(ACCESS).map_err(db_err)?;
            let mut used = tx.open_table(USED).map_err(db_err)?;
            let mut st = self.lock();
            for loc in &rows.records {
                put_json(&mut records, loc, st.records.get(loc))?;
            }
            for src in &rows.access {
                put_json(&mut access, src, st.access.get(src))?;
            }
            let dirty = std::mem::take(&mut st.used_dirty);
            for d in dirty {
                let key = d.to_string();
                match st.used.get(&d) {
                    Some(at) => {
                        used.insert(key.as_str(), *at).map_err(db_err)?;
                    }
                    None => {
                        used.remove(key.as_str()).map_err(db_err)?;
                    }
                }
            }
        }
        tx.commit().map_err(db_err)
    }

    /// Writes `rows` off the async runtime.
    async fn persist(&self, rows: Rows) -> Result<()> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.write(rows))
            .await
            .map_err(|e| Error::internal("writing the index", e))?
    }

    /// The record for `location`.
    pub fn get(&self, location: &str) -> Option<Record> {
        self.read().records.get(location).cloned()
    }

    /// Changes the record of `location`: `change` sees the current record (if any) and
    /// returns the new one (`None` removes it). The only way to change a record: it runs
    /// under the index lock, so concurrent changes compose instead of undoing each other.
    /// Returns the record now stored.
    pub async fn update(
        &self,
        location: &str,
        change: impl FnOnce(Option<&Record>) -> Option<Record>,
    ) -> Result<Option<Record>> {
        let now = {
            let mut st = self.lock();
            let next = change(st.records.get(location));
            match &next {
                Some(r) => {
                    debug_assert_eq!(r.location, location);
                    st.put(r.clone());
                }
                None => {
                    st.take(location);
                }
            }
            next
        };
        self.persist(Rows {
            records: vec![location.to_string()],
            access: Vec::new(),
        })
        .await?;
        Ok(now)
    }

    /// What the registry confirmed about access to `source`.
    pub fn access(&self, source: &str) -> Access {
        self.read().access.get(source).cloned().unwrap_or_default()
    }

    /// Records a grant for `source`.
    pub async fn grant(&self, source: &str, grant: &Grant) -> Result<()> {
        {
            let mut st = self.lock();
            let a = st.access.entry(source.to_string()).or_default();
            match grant {
                Grant::Public => a.public_at = Some(now_millis()),
                Grant::Credential(id) => {
                    a.verified.insert(id.clone(), now_millis());
                }
            }
        }
        self.persist(Rows {
            records: Vec::new(),
            access: vec![source.to_string()],
        })
        .await
    }

    /// Forgets that `ids` were accepted for `source` (the registry refused them), and with
    /// `anonymous` that it was public; true when something was known.
    pub async fn revoke(&self, source: &str, ids: &[String], anonymous: bool) -> Result<bool> {
        let changed = {
            let mut st = self.lock();
            let Some(a) = st.access.get_mut(source) else {
                return Ok(false);
            };
            let before = a.verified.len();
            a.verified.retain(|k, _| !ids.contains(k));
            let was_public = anonymous && a.public_at.take().is_some();
            a.verified.len() != before || was_public
        };
        if changed {
            self.persist(Rows {
                records: Vec::new(),
                access: vec![source.to_string()],
            })
            .await?;
        }
        Ok(changed)
    }

    /// How `module` may be read: `None` when no record serves it.
    pub fn module_access(&self, module: &Digest) -> Option<ModuleAccess> {
        let st = self.read();
        let mut found: Option<ModuleAccess> = None;
        for r in st.of_module(module) {
            let m = found.get_or_insert(ModuleAccess {
                open: false,
                public_at: None,
                oci: None,
            });
            if !r.is_oci() {
                m.open = true;
                continue;
            }
            let at = st.access.get(&r.source).and_then(|a| a.public_at);
            if at > m.public_at {
                m.public_at = at;
            }
            if m.oci.is_none() {
                m.oci = Some((r.source.clone(), r.image_digest.unwrap_or(r.top_digest())));
            }
        }
        found
    }

    /// The records that map to `module`.
    pub fn records_of_module(&self, module: &Digest) -> Vec<Record> {
        self.read().of_module(module).cloned().collect()
    }

    /// The newest time credential `id` was accepted for a source holding `module`.
    pub fn credential_verified_for_module(&self, module: &Digest, id: &str) -> Option<u64> {
        let st = self.read();
        st.of_module(module)
            .filter_map(|r| st.access.get(&r.source)?.verified.get(id).copied())
            .max()
    }

    /// Notes that `module` was served now (in memory; written with the next transaction or
    /// [`Index::flush_used`]).
    pub fn touch(&self, module: &Digest) {
        let mut st = self.lock();
        st.used.insert(*module, now_millis());
        st.used_dirty.insert(*module);
    }

    /// Writes use times not yet on disk.
    pub async fn flush_used(&self) -> Result<()> {
        if self.read().used_dirty.is_empty() {
            return Ok(());
        }
        self.persist(Rows::default()).await
    }

    /// Every cached module with what maps to it, ordered by digest.
    pub fn modules(&self) -> Vec<ModuleInfo> {
        let st = self.read();
        let mut by: BTreeMap<Digest, ModuleInfo> = BTreeMap::new();
        for r in st.records.values() {
            let public = !r.is_oci()
                || st
                    .access
                    .get(&r.source)
                    .is_some_and(|a| a.public_at.is_some());
            let e = by.entry(r.module).or_insert_with(|| ModuleInfo {
                digest: r.module,
                size: r.size,
                locations: Vec::new(),
                last_used: st.used.get(&r.module).copied(),
                pulled_at: r.fetched_at,
                public: false,
                signed: None,
            });
            if let Some(key) = r.signature.as_ref().and_then(|c| c.key.clone()) {
                e.signed = Some(key);
            }
            e.locations.push(r.location.clone());
            e.pulled_at = e.pulled_at.min(r.fetched_at);
            e.public |= public;
        }
        by.into_values().collect()
    }

    /// Number of modules and their bytes, without building the list.
    pub fn totals(&self) -> (u64, u64) {
        let st = self.read();
        let mut seen = BTreeSet::new();
        let mut bytes = 0;
        for r in st.records.values() {
            if seen.insert(r.module) {
                bytes += r.size;
            }
        }
        (seen.len() as u64, bytes)
    }

    fn remove_modules_in_memory(&self, digests: &[Digest]) -> Rows {
        let mut st = self.lock();
        let mut rows = Rows::default();
        let mut sources = BTreeSet::new();
        for d in digests {
            let locations: Vec<String> =
                st.by_module.get(d).into_iter().flatten().cloned().collect();
            for loc in locations {
                if let Some(r) = st.take(&loc) {
                    sources.insert(r.source);
                    rows.records.push(loc);
                }
            }
        }
        // What a purge removes takes its access records along, unless another module of
        // the same source is still cached.
        for src in sources {
            if !st.by_source.contains_key(&src) && st.access.remove(&src).is_some() {
                rows.access.push(src);
            }
        }
        for d in digests {
            st.used.remove(d);
            st.used_dirty.insert(*d);
        }
        rows
    }

    /// Removes every record of the modules in `digests` and their use times, on disk too.
    pub async fn remove_modules(&self, digests: &[Digest]) -> Result<()> {
        let rows = self.remove_modules_in_memory(digests);
        self.persist(rows).await
    }

    /// Forgets credential verifications made before `before_ms` (they no longer count).
    pub async fn prune_verified(&self, before_ms: u64) -> Result<usize> {
        let mut rows = Rows::default();
        let mut n = 0;
        {
            let mut st = self.lock();
            for (src, a) in st.access.iter_mut() {
                let len = a.verified.len();
                a.verified.retain(|_, at| *at >= before_ms);
                if a.verified.len() != len {
                    n += len - a.verified.len();
                    rows.access.push(src.clone());
                }
            }
        }
        if n > 0 {
            self.persist(rows).await?;
        }
        Ok(n)
    }

    /// All records (a snapshot).
    pub fn records(&self) -> Vec<Record> {
        self.read().records.values().cloned().collect()
    }

    /// A record of `source` whose module, manifest or index digest is every one of `digests`.
    pub fn find_by_digests(&self, source: &str, digests: &[Digest]) -> Option<Record> {
        self.read()
            .of_source(source)
            .find(|r| digests.iter().all(|d| r.answers_to(d)))
            .cloned()
    }

    /// True when `source` already produced the module `module` (so its bytes may be reused
    /// for that source without downloading them again).
    pub fn source_has_module(&self, source: &str, module: &Digest) -> bool {
        self.read().of_source(source).any(|r| r.module == *module)
    }

    /// The registry endpoint's manifest records of `source` that reference `d` (a blob or
    /// child manifest it may serve from that repository).
    pub fn raw_referrers(&self, source: &str, d: &Digest) -> Vec<Record> {
        self.read()
            .raw_of_source(source)
            .filter(|r| r.raw.as_ref().is_some_and(|o| o.refs.contains(d)))
            .cloned()
            .collect()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.read().records.len()
    }

    /// True when there are no records.
    pub fn is_empty(&self) -> bool {
        self.read().records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(location: &str, module: Digest) -> Record {
        Record {
            signature: None,
            raw: None,
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

    async fn put(index: &Index, r: Record) {
        let loc = r.location.clone();
        index.update(&loc, move |_| Some(r)).await.unwrap();
    }

    fn blob(store: &Store, bytes: &[u8]) -> Digest {
        let mut tmp = store.temp_file().unwrap();
        std::io::Write::write_all(&mut tmp, bytes).unwrap();
        let d = Digest::of(bytes);
        store.commit(tmp, &d).unwrap();
        d
    }

    #[tokio::test]
    async fn prunes_only_old_verifications() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let index = Index::open(&store).unwrap();
        index
            .grant("oci://r/x", &Grant::Credential("old".into()))
            .await
            .unwrap();
        let cutoff = now_millis() + 1;
        index.grant("oci://r/x", &Grant::Public).await.unwrap();
        assert_eq!(index.prune_verified(cutoff).await.unwrap(), 1);
        assert!(index.access("oci://r/x").verified.is_empty());
        assert!(
            index.access("oci://r/x").public_at.is_some(),
            "public access is not a verification"
        );
        index
            .grant("oci://r/x", &Grant::Credential("new".into()))
            .await
            .unwrap();
        assert_eq!(index.prune_verified(cutoff - 1000).await.unwrap(), 0);
        drop(index);
        let reopened = Index::open(&store).unwrap();
        let a = reopened.access("oci://r/x");
        assert!(
            a.public_at.is_some()
                && a.verified.contains_key("new")
                && !a.verified.contains_key("old")
        );
    }

    #[tokio::test]
    async fn persists_and_drops_records_without_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let index = Index::open(&store).unwrap();
        let kept = blob(&store, b"kept");
        put(&index, record("oci://r/x:a", kept)).await;
        put(&index, record("oci://r/x:b", Digest::of(b"gone"))).await;
        index.touch(&kept);
        index.flush_used().await.unwrap();
        assert_eq!(index.len(), 2);
        // A blob no record points to is removed at open.
        let orphan = blob(&store, b"orphan");
        drop(index);

        let reopened = Index::open(&store).unwrap();
        assert_eq!(reopened.len(), 1);
        assert!(!store.has(&orphan));
        assert!(store.has(&kept));
        assert_eq!(reopened.get("oci://r/x:a").unwrap().module, kept);
        assert!(reopened.modules()[0].last_used.is_some());
        assert!(
            reopened
                .find_by_digests("oci://r/x", &[Digest::of(b"manifest")])
                .is_some()
        );
        assert!(
            reopened
                .find_by_digests("oci://other/x", &[Digest::of(b"manifest")])
                .is_none()
        );
    }

    #[tokio::test]
    async fn lookups_by_module_and_source_follow_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let index = Index::open(&store).unwrap();
        let (a, b) = (blob(&store, b"a"), blob(&store, b"b"));
        put(&index, record("oci://r/x:1", a)).await;
        assert!(index.module_access(&a).is_some());
        assert!(index.source_has_module("oci://r/x", &a));
        // The tag moves to another module: the old one is no longer served by it.
        put(&index, record("oci://r/x:1", b)).await;
        assert!(index.module_access(&a).is_none());
        assert!(!index.source_has_module("oci://r/x", &a));
        assert!(index.find_by_digests("oci://r/x", &[b]).is_some());
        index.remove_modules(&[b]).await.unwrap();
        assert!(index.module_access(&b).is_none());
        assert!(index.find_by_digests("oci://r/x", &[b]).is_none());
        drop(index);
        let reopened = Index::open(&store).unwrap();
        assert!(reopened.is_empty());
    }

    #[tokio::test]
    async fn concurrent_updates_of_one_record_compose() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let index = Index::open(&store).unwrap();
        let d = blob(&store, b"m");
        put(&index, record("oci://r/x:a", d)).await;
        // Two callers each note their own resource version at once: both survive.
        let mut tasks = Vec::new();
        for i in 0..20 {
            let index = index.clone();
            tasks.push(tokio::spawn(async move {
                index
                    .update("oci://r/x:a", |r| {
                        let mut r = r.cloned()?;
                        r.versions.insert(format!("ns/p{i}"), i.to_string());
                        Some(r)
                    })
                    .await
                    .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(index.get("oci://r/x:a").unwrap().versions.len(), 20);
        drop(index);
        let reopened = Index::open(&store).unwrap();
        assert_eq!(reopened.get("oci://r/x:a").unwrap().versions.len(), 20);
    }

    #[tokio::test]
    async fn a_damaged_database_is_kept_aside_and_costs_no_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let index = Index::open(&store).unwrap();
        let d = blob(&store, b"module");
        put(&index, record("oci://r/x:a", d)).await;
        drop(index);
        // What a bad disk left (written around the store on purpose).
        std::fs::File::create(dir.path().join(DB_FILE))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"garbage"))
            .unwrap();
        let index = Index::open(&store).unwrap();
        let aside = index.damaged().expect("damage noticed").to_path_buf();
        assert!(aside.exists());
        assert!(index.is_empty());
        assert!(store.has(&d), "the blob is kept");
        drop(index);
        // Later starts keep unreferenced blobs while the damaged copy is there...
        let index = Index::open(&store).unwrap();
        assert!(index.damaged().is_none());
        assert!(store.has(&d));
        drop(index);
        // ...and clean them up once an operator removed it.
        std::fs::remove_file(aside).unwrap();
        Index::open(&store).unwrap();
        assert!(!store.has(&d));
    }

    /// Issue 9: an `index.json` cut short made the daemon start empty and delete every blob.
    #[tokio::test]
    async fn issue_9_a_cut_short_index_json_is_kept_aside_and_costs_no_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = blob(&store, b"module");
        std::fs::File::create(dir.path().join(LEGACY_FILE))
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, b"{\"version\":1,\"records\":[{\"loc")
            })
            .unwrap();
        let index = Index::open(&store).unwrap();
        assert!(index.is_empty());
        assert!(store.has(&d), "the blob is kept");
        assert!(!dir.path().join(LEGACY_FILE).exists());
        assert!(store.has_meta_prefixed(DAMAGED_PREFIX).unwrap());
    }

    #[tokio::test]
    async fn migrates_an_index_json_from_an_earlier_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = blob(&store, b"module");
        // The format main wrote before the database: times in seconds, pretty JSON.
        let legacy = serde_json::json!({
            "version": 1,
            "records": [{
                "location": "oci://reg.example/acme/acl:1.2",
                "source": "oci://reg.example/acme/acl",
                "module": d.to_string(),
                "size": 6,
                "imageDigest": Digest::of(b"manifest").to_string(),
                "fetchedAt": 1_700_000_000u64,
                "resolvedAt": 1_700_000_100u64,
                "versions": {"ns/acl": "42"}
            }],
            "access": {"oci://reg.example/acme/acl": {"public": false, "verified": {"cred1": 1_700_000_000_000u64}}},
            "used": {d.to_string(): 1_700_000_200_000u64}
        });
        std::fs::File::create(dir.path().join("index.json"))
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, &serde_json::to_vec_pretty(&legacy).unwrap())
            })
            .unwrap();
        let index = Index::open(&store).unwrap();
        let r = index.get("oci://reg.example/acme/acl:1.2").unwrap();
        assert_eq!(r.module, d);
        assert_eq!(
            r.fetched_at, 1_700_000_000_000,
            "seconds became milliseconds"
        );
        assert_eq!(r.versions["ns/acl"], "42");
        assert_eq!(
            index.access("oci://reg.example/acme/acl").verified["cred1"],
            1_700_000_000_000
        );
        assert_eq!(index.modules()[0].last_used, Some(1_700_000_200_000));
        assert!(store.has(&d), "the migrated module's blob is kept");
        assert!(!dir.path().join("index.json").exists());
        assert!(dir.path().join("index.json.migrated").exists());
        // A second start reads the database, not the old file.
        drop(index);
        assert_eq!(Index::open(&store).unwrap().len(), 1);
    }
}
