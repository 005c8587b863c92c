//! The cache's lifecycle: use counters, purges (by url, digest, age, or all), the periodic
//! expiry sweep, eviction under `[cache] max_size`, and blob integrity checks.
//!
//! "Used" means served to a caller (a hit, a miss, a `GET /v1/modules/...`), never merely
//! looked up: Istio's agent purged modules proxies still used (istio#42154).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, Hasher};
use crate::error::{Code, Error, Result};
use crate::index::{ModuleInfo, Record, now_millis};
use crate::service::Service;
use crate::source::Source;

/// What `stats` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StatsReport {
    /// Cached modules.
    pub entries: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Configured bound, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Fetch hits since start.
    pub hits: u64,
    /// Fetch misses since start.
    pub misses: u64,
    /// Revalidated fetches since start.
    pub revalidated: u64,
    /// Failed fetches since start.
    pub errors: u64,
    /// Evictions since start.
    pub evictions: u64,
    /// Modules purged since start.
    pub purged: u64,
    /// Corrupt blobs dropped since start.
    pub corrupt: u64,
}

/// Which modules a purge removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Selector {
    /// Everything.
    All,
    /// The modules a url maps to (for an OCI repository without tag: all of its tags).
    Url(String),
    /// One module, by its digest (or the manifest/index digest it was pulled by).
    Digest(Digest),
    /// Modules not served for this many milliseconds.
    UnusedForMs(u64),
}

/// What a purge removed (or would remove, on a dry run).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PurgeReport {
    /// The modules.
    pub removed: Vec<ModuleInfo>,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// True when nothing was removed because it was a dry run.
    pub dry_run: bool,
}

impl Service {
    /// Counters and sizes.
    pub fn stats_report(&self) -> StatsReport {
        let modules = self.index.modules();
        let m = &self.metrics;
        StatsReport {
            entries: modules.len() as u64,
            bytes: modules.iter().map(|m| m.size).sum(),
            max_bytes: self.cache.max_size,
            hits: m.lookups_of("hit"),
            misses: m.lookups_of("miss"),
            revalidated: m.lookups_of("revalidated"),
            errors: m.lookups_of("error"),
            evictions: m.evictions.get(),
            purged: m.purged.get(),
            corrupt: m.corrupt.get(),
        }
    }

    /// The Prometheus text exposition, with cache gauges brought up to date.
    pub fn metrics_text(&self) -> String {
        let modules = self.index.modules();
        self.metrics.entries.set(modules.len() as i64);
        self.metrics
            .bytes
            .set(modules.iter().map(|m| m.size).sum::<u64>() as i64);
        self.metrics.render()
    }

    /// Counts module bytes sent to a caller.
    pub fn count_served(&self, bytes: u64) {
        self.metrics.served_bytes.inc_by(bytes);
    }

    /// Every cached module.
    pub fn list(&self) -> Vec<ModuleInfo> {
        self.index.modules()
    }

    /// Removes the modules `selector` picks, with every record that points to them. Streams
    /// in progress keep their open file; fetches in progress finish into a consistent cache.
    pub async fn purge(&self, selector: &Selector, dry_run: bool) -> Result<PurgeReport> {
        let _guard = self.cache_lock.lock().await;
        let chosen = self.select(selector)?;
        if !dry_run {
            self.remove(&chosen).await?;
            self.metrics.purged.inc_by(chosen.len() as u64);
            if !chosen.is_empty() {
                tracing::info!(modules = chosen.len(), selector = ?selector, "purged");
            }
        }
        Ok(PurgeReport {
            freed_bytes: chosen.iter().map(|m| m.size).sum(),
            removed: chosen,
            dry_run,
        })
    }

    fn select(&self, selector: &Selector) -> Result<Vec<ModuleInfo>> {
        let modules = self.index.modules();
        let records = self.index.records();
        let picked_by_records = |keep: &dyn Fn(&Record) -> bool| -> Vec<ModuleInfo> {
            let digests: Vec<Digest> = records
                .iter()
                .filter(|r| keep(r))
                .map(|r| r.module)
                .collect();
            modules
                .iter()
                .filter(|m| digests.contains(&m.digest))
                .cloned()
                .collect()
        };
        Ok(match selector {
            Selector::All => modules,
            Selector::Digest(d) => picked_by_records(&|r| r.answers_to(d)),
            Selector::Url(url) => {
                let source = Source::parse(url)?;
                let location = source.location_key();
                let whole_repo = matches!(&source, Source::Oci(r) if r.implicit_tag);
                let source_key = source.source_key();
                picked_by_records(&|r| {
                    r.location == location || (whole_repo && r.source == source_key)
                })
            }
            Selector::UnusedForMs(ms) => {
                let cutoff = now_millis().saturating_sub(*ms);
                modules
                    .into_iter()
                    .filter(|m| m.last_used.unwrap_or(m.pulled_at.saturating_mul(1000)) < cutoff)
                    .collect()
            }
        })
    }

    /// Drops modules from the index (persisted first), then deletes their blobs. Call with
    /// `cache_lock` held.
    async fn remove(&self, modules: &[ModuleInfo]) -> Result<()> {
        if modules.is_empty() {
            return Ok(());
        }
        let digests: Vec<Digest> = modules.iter().map(|m| m.digest).collect();
        self.index.remove_modules(&digests);
        // Records go first: a crash in between leaves an unreferenced blob, never a record
        // without its blob.
        self.index.persist().await?;
        let store = self.store.clone();
        let ds = digests.clone();
        tokio::task::spawn_blocking(move || ds.iter().try_for_each(|d| store.remove(d)))
            .await
            .map_err(|e| Error::internal("removing modules", e))??;
        let mut intact = self.intact.lock().unwrap_or_else(|p| p.into_inner());
        for d in &digests {
            intact.remove(d);
        }
        Ok(())
    }

    /// Evicts least recently used modules until `rec` fits under `max_size`. Call with
    /// `cache_lock` held.
    pub(crate) async fn make_room(&self, rec: &Record) -> Result<()> {
        let Some(max) = self.cache.max_size else {
            return Ok(());
        };
        if rec.size > max {
            return Err(Error::new(
                Code::TooLarge,
                format!(
                    "the module is {} bytes, more than the whole cache may hold ([cache] max_size = {max})",
                    rec.size
                ),
            ));
        }
        let mut modules = self.index.modules();
        if modules.iter().any(|m| m.digest == rec.module) {
            return Ok(());
        }
        let mut total: u64 = modules.iter().map(|m| m.size).sum();
        if total + rec.size <= max {
            return Ok(());
        }
        modules.sort_by_key(|m| {
            (
                m.last_used.unwrap_or(m.pulled_at.saturating_mul(1000)),
                m.digest,
            )
        });
        let mut victims = Vec::new();
        for m in modules {
            if total + rec.size <= max {
                break;
            }
            total -= m.size;
            victims.push(m);
        }
        for v in &victims {
            tracing::info!(digest = %v.digest, bytes = v.size, "evicting least recently used module to respect [cache] max_size");
        }
        self.metrics.evictions.inc_by(victims.len() as u64);
        self.remove(&victims).await
    }

    /// The periodic sweep: removes modules unused for longer than `unused_expiry`, forgets
    /// credential verifications past their TTL, and writes last-use times to disk.
    pub async fn sweep(&self) -> Result<()> {
        if let crate::config::VerifyPolicy::Ttl(ttl) = self.auth.verify {
            let before = now_millis().saturating_sub(ttl.as_millis() as u64);
            let n = self.index.prune_verified(before);
            if n > 0 {
                tracing::debug!(n, "forgot expired credential verifications");
            }
        }
        if let Some(expiry) = self.cache.unused_expiry {
            let r = self
                .purge(&Selector::UnusedForMs(expiry.as_millis() as u64), false)
                .await?;
            if !r.removed.is_empty() {
                tracing::info!(
                    modules = r.removed.len(),
                    bytes = r.freed_bytes,
                    "expired unused modules"
                );
            }
        }
        self.index.persist().await
    }

    /// Runs [`Service::sweep`] every `purge_interval` until `shutdown` completes.
    pub async fn sweep_every_interval(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let period: Duration = self.cache.purge_interval;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.sweep().await {
                        tracing::warn!(error = %e, "cache sweep failed");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// True when the blob for `d` matches its digest (re-hashing it once per process);
    /// otherwise drops the module and its records and returns false.
    pub async fn ensure_intact(&self, d: &Digest) -> Result<bool> {
        if self
            .intact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(d)
        {
            return Ok(true);
        }
        let path = self.store.blob_path(d);
        let actual = tokio::task::spawn_blocking(move || hash_file(&path))
            .await
            .map_err(|e| Error::internal("hashing module", e))?;
        match actual {
            Ok(Some(got)) if got == *d => {
                self.intact
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(*d);
                Ok(true)
            }
            Ok(got) => {
                tracing::error!(
                    digest = %d,
                    found = ?got,
                    "cached module is corrupt or missing; dropping it (it will be fetched again)"
                );
                self.metrics.corrupt.inc();
                let _guard = self.cache_lock.lock().await;
                let victims: Vec<ModuleInfo> = self
                    .index
                    .modules()
                    .into_iter()
                    .filter(|m| m.digest == *d)
                    .collect();
                self.remove(&victims).await?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Re-hashes every cached blob (the `verify_blobs = "scan"` start-up check).
    pub async fn scan(&self) -> Result<()> {
        let modules = self.index.modules();
        let mut bad = 0;
        for m in &modules {
            if !self.ensure_intact(&m.digest).await? {
                bad += 1;
            }
        }
        tracing::info!(
            modules = modules.len(),
            corrupt = bad,
            "blob integrity scan done"
        );
        Ok(())
    }
}

/// sha256 of a file; `None` when it does not exist.
fn hash_file(path: &std::path::Path) -> Result<Option<Digest>> {
    use std::io::Read;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::internal("opening module", e)),
    };
    let mut h = Hasher::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::internal("reading module", e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Some(h.finish()))
}
