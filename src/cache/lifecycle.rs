//! The cache's lifecycle: purges (by url, digest, age, or all), the periodic expiry sweep,
//! eviction under `[cache] max_size`, and the start-up integrity scan.
//!
//! "Used" means served to a caller (a hit, a miss, a `GET /v1/modules/...`), never merely
//! looked up: Istio's agent purged modules proxies still used (istio#42154).

use std::time::Duration;

use super::Cache;
use super::index::{Record, now_millis};
use crate::api::{ModuleInfo, PurgeBody, PurgeReport};
use crate::digest::Digest;
use crate::error::{Code, Error, Result};
use crate::source::Source;

/// Which modules a purge removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Everything.
    All,
    /// The modules a url maps to (for an OCI repository without tag: all of its tags).
    Url(String),
    /// One module, by its digest (or the manifest/index digest it was pulled by).
    Digest(Digest),
    /// Modules not served for this long.
    UnusedFor(Duration),
}

impl PurgeBody {
    /// The selector, when exactly one is given.
    pub fn selector(&self) -> Result<Selector> {
        let mut chosen = Vec::new();
        if self.all {
            chosen.push(Selector::All);
        }
        if let Some(u) = &self.url {
            chosen.push(Selector::Url(u.clone()));
        }
        if let Some(d) = &self.digest {
            chosen.push(Selector::Digest(d.parse::<Digest>()?));
        }
        if let Some(u) = &self.unused_for {
            let d = humantime::parse_duration(u).map_err(|e| {
                Error::invalid(format!(
                    "unusedFor {u:?} is not a duration like \"7d\": {e}"
                ))
            })?;
            chosen.push(Selector::UnusedFor(d));
        }
        match chosen.len() {
            1 => Ok(chosen.remove(0)),
            0 => Err(Error::invalid(
                "purge needs one of all, url, digest, unusedFor",
            )),
            _ => Err(Error::invalid(
                "purge takes only one of all, url, digest, unusedFor",
            )),
        }
    }
}

impl Cache {
    /// Every cached module.
    pub fn list(&self) -> Vec<ModuleInfo> {
        self.index.modules()
    }

    /// Removes the modules `selector` picks, with every record that points to them. Streams
    /// in progress keep their open file; fetches in progress finish into a consistent cache.
    pub async fn purge(&self, selector: &Selector, dry_run: bool) -> Result<PurgeReport> {
        let _guard = self.lock.lock().await;
        let chosen = self.select(selector)?;
        if !dry_run {
            let digests: Vec<Digest> = chosen.iter().map(|m| m.digest).collect();
            self.remove(&digests).await?;
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
        let picked_by_records = |keep: &dyn Fn(&Record) -> bool| -> Vec<ModuleInfo> {
            let digests: std::collections::BTreeSet<Digest> = self
                .index
                .records()
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
            Selector::All => modules.clone(),
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
            Selector::UnusedFor(age) => {
                let cutoff = now_millis().saturating_sub(age.as_millis() as u64);
                modules
                    .into_iter()
                    .filter(|m| m.last_touched() < cutoff)
                    .collect()
            }
        })
    }

    /// Evicts least recently used modules until `rec` fits under `max_size`. Call with the
    /// lock held.
    pub(super) async fn make_room(&self, rec: &Record) -> Result<()> {
        let Some(max) = self.settings.max_size else {
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
        // Downloads in progress count too: they are about to need the room.
        let room = max.saturating_sub(self.store.pending_bytes());
        let mut total: u64 = modules.iter().map(|m| m.size).sum();
        if total + rec.size <= room {
            return Ok(());
        }
        modules.sort_by_key(|m| (m.last_touched(), m.digest));
        let mut victims = Vec::new();
        for m in modules {
            if total + rec.size <= room {
                break;
            }
            total -= m.size;
            tracing::info!(digest = %m.digest, bytes = m.size, "evicting least recently used module to respect [cache] max_size");
            victims.push(m.digest);
        }
        self.metrics.evictions.inc_by(victims.len() as u64);
        self.remove(&victims).await
    }

    /// The periodic sweep: forgets credential verifications made before `verified_before`
    /// (unix ms), removes modules unused for longer than `unused_expiry`, and writes use
    /// times to disk.
    pub async fn sweep(&self, verified_before: Option<u64>) -> Result<()> {
        if let Some(before) = verified_before {
            let n = self.index.prune_verified(before).await?;
            if n > 0 {
                tracing::debug!(n, "forgot expired credential verifications");
            }
        }
        if let Some(expiry) = self.settings.unused_expiry {
            let r = self.purge(&Selector::UnusedFor(expiry), false).await?;
            if !r.removed.is_empty() {
                tracing::info!(
                    modules = r.removed.len(),
                    bytes = r.freed_bytes,
                    "expired unused modules"
                );
            }
        }
        self.index.flush_used().await
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
