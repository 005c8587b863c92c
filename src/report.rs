//! Human-readable output of the admin commands.

use std::fmt::Write as _;

use crate::api::{ModuleInfo, PurgeReport, StatsReport};
use crate::cache::index::now_millis;

/// `1.5 MiB`-style sizes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `3m ago`-style ages from unix milliseconds.
pub fn ago(ms: Option<u64>) -> String {
    let Some(ms) = ms else {
        return "never".to_string();
    };
    let s = now_millis().saturating_sub(ms) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// The `ls` table.
pub fn modules_table(modules: &[ModuleInfo]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<71}  {:>10}  {:>10}  {:>10}  {:<7}  {:<16}  SOURCES",
        "DIGEST", "SIZE", "LAST USED", "PULLED", "ACCESS", "SIGNED"
    );
    for m in modules {
        let _ = writeln!(
            out,
            "{:<71}  {:>10}  {:>10}  {:>10}  {:<7}  {:<16}  {}",
            m.digest.to_string(),
            bytes(m.size),
            ago(m.last_used),
            ago(Some(m.pulled_at)),
            if m.public { "public" } else { "private" },
            m.signed.as_deref().unwrap_or("-"),
            m.locations.join(", ")
        );
    }
    let total: u64 = modules.iter().map(|m| m.size).sum();
    let _ = writeln!(out, "{} modules, {}", modules.len(), bytes(total));
    out
}

/// The `purge` summary.
pub fn purge_summary(r: &PurgeReport) -> String {
    let mut out = String::new();
    let verb = if r.dry_run { "would remove" } else { "removed" };
    for m in &r.removed {
        let _ = writeln!(
            out,
            "{verb} {} ({}) {}",
            m.digest,
            bytes(m.size),
            m.locations.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "{} {} modules, {} {}",
        verb,
        r.removed.len(),
        bytes(r.freed_bytes),
        if r.dry_run { "would be freed" } else { "freed" }
    );
    out
}

/// The `stats` text.
pub fn stats_text(s: &StatsReport) -> String {
    let bound = s
        .max_bytes
        .map(|m| format!(" of {}", bytes(m)))
        .unwrap_or_default();
    format!(
        "entries:     {}\nbytes:       {}{bound}\nhits:        {}\nmisses:      {}\nrevalidated: {}\nerrors:      {}\nevictions:   {}\npurged:      {}\ncorrupt:     {}\n",
        s.entries,
        bytes(s.bytes),
        s.hits,
        s.misses,
        s.revalidated,
        s.errors,
        s.evictions,
        s.purged,
        s.corrupt
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(10 << 30), "10.0 GiB");
        assert_eq!(ago(None), "never");
        assert_eq!(ago(Some(now_millis() - 120_000)), "2m ago");
    }
}
