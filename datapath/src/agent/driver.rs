//! The one loop every half of the agent runs (services, NodePort, policy): fold API
//! changes into plain data, write the maps once the watches have listed, retry a failed
//! write on the next tick, and report "synced" the same way, which `/readyz` and the
//! migration's gate read.
//!
//! Why not kube-runtime's `Controller`: a Controller reconciles one object at a time
//! from reflector stores of whole API objects. Each half here computes its maps from
//! all objects of several kinds at once (a Service's entries need its slices; a pod's
//! policy needs every policy and namespace), and keeping whole objects is what the
//! agent's memory budget cannot afford (BENCHMARKS.md, "Agent resident memory": plain
//! data only, no stores). The watches feed plain data through [`super::pump_to`].

use super::metrics::Metrics;
use anyhow::Result;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often a failed write is retried, and a half's own periodic work runs.
pub const TICK: Duration = Duration::from_secs(1);

/// What a wake from a half's own event source asks of the driver.
pub enum Woke {
    /// Handled there (flow events forwarded): no pass.
    Handled,
    /// Run a pass (e.g. the CNI plugin asked for an attach).
    Pass,
}

/// One half: its plain data and its maps.
pub trait Half: Send {
    type Msg: Send;

    /// For logs and errors.
    fn name(&self) -> &'static str;

    /// Folds one change into the plain data. True when it was a (re)list: its decoded
    /// objects are freed once written (see [`super::memory`]).
    fn apply(&mut self, m: Self::Msg) -> bool;

    /// Every watch the half needs has delivered a full list: before that, writing
    /// would delete entries of objects not listed yet.
    fn listed(&self) -> bool;

    /// Work that can make a write needed without an API change (the CNI plugin's asks
    /// recording an address). Runs on every pass once listed.
    fn prepare(&mut self) -> bool {
        false
    }

    /// Writes the maps from the plain data. Returns the number of failed writes (0:
    /// everything written); the half logs why.
    fn write(&mut self) -> u64;

    /// Runs on every pass once listed, after the write (`written`: it succeeded).
    fn finish(&mut self, _written: bool) {}

    /// The half's own event source beside the API (its flow ring, the plugin's asks).
    /// Pending forever when it has none.
    fn side(&mut self) -> impl Future<Output = Woke> + Send {
        std::future::pending()
    }

    /// Its "synced" gauge: 1 once its maps were written from a full list.
    fn synced<'m>(&self, m: &'m Metrics) -> &'m AtomicU64;

    /// Where the duration of its last write goes, if anywhere.
    fn last_write<'m>(&self, _m: &'m Metrics) -> Option<&'m AtomicU64> {
        None
    }
}

/// Runs `half` until `stop` resolves (Ok) or its watches end (an error).
pub async fn drive<H: Half>(
    mut half: H,
    mut rx: mpsc::UnboundedReceiver<H::Msg>,
    metrics: &Metrics,
    stop: impl Future<Output = ()>,
) -> Result<()> {
    let mut stop = std::pin::pin!(stop);
    // A change arrived that is not written yet (or its write failed).
    let mut dirty = false;
    let mut relisted = false;
    let mut tick = tokio::time::interval(TICK);
    loop {
        // From an API change's arrival to its write done, for `last_write`.
        let mut started = None;
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else { anyhow::bail!("{}: the watches ended", half.name()) };
                started = Some(Instant::now());
                relisted |= half.apply(m);
                // Take whatever else is queued: one write for a burst of events.
                while let Ok(m) = rx.try_recv() {
                    relisted |= half.apply(m);
                }
                dirty = true;
            }
            _ = tick.tick() => {}
            w = half.side() => if let Woke::Handled = w { continue },
            _ = &mut stop => return Ok(()),
        }
        if !half.listed() {
            continue;
        }
        dirty |= half.prepare();
        if dirty {
            let started = started.unwrap_or_else(Instant::now);
            let failed = half.write();
            if failed == 0 {
                dirty = false;
                half.synced(metrics).store(1, Relaxed);
                if std::mem::take(&mut relisted) {
                    super::memory::release_freed();
                }
            } else {
                metrics.sync_errors.fetch_add(failed, Relaxed);
            }
            metrics.syncs.fetch_add(1, Relaxed);
            if let Some(g) = half.last_write(metrics) {
                g.store(started.elapsed().as_nanos() as u64, Relaxed);
            }
        }
        half.finish(!dirty);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A half that records what it was asked to do, and fails its first `fail` writes.
    struct Probe {
        listed: bool,
        fail: u64,
        writes: Arc<Mutex<Vec<Vec<u32>>>>,
        seen: Vec<u32>,
    }

    impl Half for Probe {
        type Msg = u32;
        fn name(&self) -> &'static str {
            "probe"
        }
        fn apply(&mut self, m: u32) -> bool {
            if m == 0 {
                self.listed = true;
            } else {
                self.seen.push(m);
            }
            m == 0
        }
        fn listed(&self) -> bool {
            self.listed
        }
        fn write(&mut self) -> u64 {
            self.writes.lock().unwrap().push(self.seen.clone());
            if self.fail > 0 {
                self.fail -= 1;
                1
            } else {
                0
            }
        }
        fn synced<'m>(&self, m: &'m Metrics) -> &'m AtomicU64 {
            &m.synced
        }
    }

    /// Waits for `f` on the paused clock. A short sleep, not `yield_now`: a task that only
    /// yields is always runnable, so the paused clock never auto-advances and neither the
    /// driver's tick nor this timeout would ever fire.
    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let t = tokio::time::timeout(Duration::from_secs(10), async {
            while !f() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        t.await.unwrap_or_else(|_| panic!("{what}"));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_written_before_the_list_and_a_failed_write_is_retried() {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let half = Probe { listed: false, fail: 1, writes: writes.clone(), seen: vec![] };
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let m = metrics.clone();
        let task = tokio::spawn(async move {
            drive(half, rx, &m, async {
                let _ = stop_rx.await;
            })
            .await
        });

        tx.send(5).unwrap();
        tokio::time::sleep(TICK * 3).await;
        assert!(writes.lock().unwrap().is_empty(), "written before the list");
        assert_eq!(metrics.synced.load(Relaxed), 0);

        // The list arrives with another change queued: one write for both, which fails,
        // then the tick retries it.
        tx.send(0).unwrap();
        tx.send(7).unwrap();
        until("the retry", || writes.lock().unwrap().len() == 2).await;
        assert_eq!(*writes.lock().unwrap(), vec![vec![5, 7], vec![5, 7]]);
        until("synced", || metrics.synced.load(Relaxed) == 1).await;
        assert_eq!(metrics.sync_errors.load(Relaxed), 1);

        // Written and clean: ticks alone write nothing.
        tokio::time::sleep(TICK * 3).await;
        assert_eq!(writes.lock().unwrap().len(), 2);

        stop_tx.send(()).unwrap();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn ended_watches_are_an_error_naming_the_half() {
        let half = Probe { listed: true, fail: 0, writes: Default::default(), seen: vec![] };
        let (tx, rx) = mpsc::unbounded_channel::<u32>();
        drop(tx);
        let e = drive(half, rx, &Metrics::default(), std::future::pending()).await.unwrap_err();
        assert_eq!(e.to_string(), "probe: the watches ended");
    }
}
