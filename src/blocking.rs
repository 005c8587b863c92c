//! Blocking work (unpacking, validation) on tokio's blocking pool that stops when nobody
//! waits for it any more: a fetch that timed out or was abandoned does not leave a thread
//! decompressing or validating for minutes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// Set when the async side stops waiting; blocking loops check it between chunks.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// True once nobody waits for the work.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Logs that `what` stopped early; for the loops that notice [`Cancel::is_set`].
    pub fn note_stopped(what: &str) {
        tracing::info!(
            work = what,
            "stopped: the fetch it was for timed out or was abandoned"
        );
    }
}

/// Sets the flag when dropped: when the future below completes, or is dropped unfinished.
struct SetOnDrop(Cancel);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.0.store(true, Ordering::Relaxed);
    }
}

/// Runs `work` on the blocking pool with a [`Cancel`] that is set as soon as this future is
/// dropped (a timeout around it, or its task ending).
pub async fn run<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce(&Cancel) -> T + Send + 'static,
) -> Result<T> {
    let cancel = Cancel::default();
    let _set = SetOnDrop(cancel.clone());
    tokio::task::spawn_blocking(move || work(&cancel))
        .await
        .map_err(|e| Error::internal(what, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn work_sees_the_flag_once_its_caller_gives_up() {
        let (tx, rx) = std::sync::mpsc::channel();
        let gave_up = tokio::time::timeout(
            Duration::from_millis(50),
            run("test", move |cancel| {
                // Bounded: a regression ends here after 20 s and fails below.
                for _ in 0..2000 {
                    if cancel.is_set() {
                        let _ = tx.send(true);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = tx.send(false);
            }),
        )
        .await;
        assert!(gave_up.is_err());
        let stopped = tokio::task::spawn_blocking(move || rx.recv().unwrap())
            .await
            .unwrap();
        assert!(
            stopped,
            "the blocking work never saw that its caller gave up"
        );
    }
}
