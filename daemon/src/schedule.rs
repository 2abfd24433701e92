//! Periodic jobs on tokio-cron-scheduler, each guarded against overlapping runs and watched for
//! liveness.
//!
//! tokio-cron-scheduler checks for due jobs every 500 ms and starts each run as a detached task,
//! so a slow run could overlap the next one: a run that finds the previous one still going is
//! skipped. Every job records when it last finished; [`JobHealth::stale`] names jobs that have
//! not finished for several periods (used to stop the systemd watchdog pings, so a silently
//! dead scheduler gets the process restarted).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_cron_scheduler::{Job, JobScheduler};
use tracing::warn;

/// When each job last finished, and how often it should.
#[derive(Default)]
pub(crate) struct JobHealth {
    jobs: Mutex<BTreeMap<&'static str, (Instant, Duration)>>,
}

impl JobHealth {
    fn stamp(&self, name: &'static str, period: Duration) {
        if let Ok(mut j) = self.jobs.lock() {
            j.insert(name, (Instant::now(), period));
        }
    }

    /// Jobs that have not finished a run for three periods plus five seconds.
    pub(crate) fn stale(&self) -> Vec<&'static str> {
        let Ok(j) = self.jobs.lock() else {
            return vec!["job-health-lock"];
        };
        j.iter()
            .filter(|(_, (at, period))| at.elapsed() > *period * 3 + Duration::from_secs(5))
            .map(|(name, _)| *name)
            .collect()
    }
}

/// The scheduler with our jobs.
pub(crate) struct Jobs {
    scheduler: JobScheduler,
    pub(crate) health: Arc<JobHealth>,
}

impl Jobs {
    pub(crate) async fn new() -> anyhow::Result<Jobs> {
        let scheduler = JobScheduler::new().await.context("cannot create the job scheduler")?;
        Ok(Jobs { scheduler, health: Arc::new(JobHealth::default()) })
    }

    /// Runs `step` every `every_secs` seconds (1..=59), never two runs at once.
    pub(crate) async fn every<F, Fut>(
        &self,
        name: &'static str,
        every_secs: u32,
        step: F,
    ) -> anyhow::Result<()>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let every_secs = every_secs.clamp(1, 59);
        let period = Duration::from_secs(u64::from(every_secs));
        let cron = if every_secs == 1 {
            "* * * * * *".to_owned()
        } else {
            format!("*/{every_secs} * * * * *")
        };
        let running = Arc::new(AtomicBool::new(false));
        let health = self.health.clone();
        health.stamp(name, period);
        let step = Arc::new(step);
        let job = Job::new_async(cron.as_str(), move |_id, _sched| {
            let running = running.clone();
            let health = health.clone();
            let step = step.clone();
            Box::pin(async move {
                if running.swap(true, Ordering::SeqCst) {
                    warn!(job = name, "previous run still going; skipping this one");
                    return;
                }
                step().await;
                running.store(false, Ordering::SeqCst);
                health.stamp(name, period);
            })
        })
        .with_context(|| format!("cannot schedule job {name}"))?;
        self.scheduler.add(job).await.with_context(|| format!("cannot add job {name}"))?;
        Ok(())
    }

    pub(crate) async fn start(&self) -> anyhow::Result<()> {
        self.scheduler.start().await.context("cannot start the job scheduler")
    }

    pub(crate) async fn shutdown(mut self) {
        if let Err(e) = self.scheduler.shutdown().await {
            warn!(error = %e, "job scheduler did not shut down cleanly");
        }
    }
}
