//! Group commit of guarded destroys (a pushed SET, a back-channel logout token) on
//! PostgreSQL. Each of these is a short transaction of a few statements; alone, its `BEGIN`
//! and `COMMIT` are two of its five round trips and its commit one WAL flush. Concurrent ones
//! are queued here instead, and a few writer tasks each take what is waiting (up to
//! [`MAX_BATCH`]) and apply it in one transaction, the statements of each command unchanged
//! and in order. No batch window: a writer takes only what queued while the previous batch
//! ran, so a lone command waits for nothing.
//!
//! Every command keeps its own outcome. A replayed guard changes nothing (its statement
//! writes no row and raises no error), so it is reported `Replayed` and the batch goes on.
//! Any other failure, of a command or of the commit, rolls the batch back and applies each
//! of its commands alone, in its own transaction with the usual retries: the failing one
//! gets its own error and the others are applied (or, had the failed commit gone through
//! after all, found replayed). A caller is answered only after its command's transaction
//! committed or failed.

use std::sync::Arc;

use sqlx::postgres::PgPool;
use tokio::sync::{Mutex, Notify, mpsc, oneshot};

use super::{destroy_alone, sessions};
use crate::domain::{DestroyCommand, Session};
use crate::store::{Result, StoreError, now_millis};

/// Commands applied in one transaction at most: a bounded statement count per transaction,
/// so row locks taken early are not held for long.
const MAX_BATCH: usize = 32;

/// Commands waiting for a writer at most; a caller beyond it waits to queue.
const QUEUE: usize = 1024;

/// One queued command and where its outcome goes.
struct Job {
    cmd: DestroyCommand,
    reply: oneshot::Sender<Result<Vec<Session>>>,
}

/// The queue of guarded destroys; its writer tasks end when the last handle is dropped.
#[derive(Clone)]
pub(super) struct GroupCommit {
    queue: mpsc::Sender<Job>,
}

impl GroupCommit {
    /// Starts `writers` writer tasks on `pool`; `committed` is signalled after a commit that
    /// ended sessions (it wrote outbox events).
    pub(super) fn start(pool: PgPool, writers: usize, committed: Arc<Notify>) -> Self {
        let (queue, jobs) = mpsc::channel(QUEUE);
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..writers.max(1) {
            tokio::spawn(writer(pool.clone(), jobs.clone(), committed.clone()));
        }
        GroupCommit { queue }
    }

    /// Applies `cmd` in a transaction with whatever else is queued, once committed.
    pub(super) async fn destroy(&self, cmd: DestroyCommand) -> Result<Vec<Session>> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { cmd, reply })
            .await
            .map_err(|_| StoreError::Unavailable)?;
        answer.await.map_err(|_| StoreError::Unavailable)?
    }
}

/// Takes what is queued, applies it, answers each caller; until the queue closes.
async fn writer(pool: PgPool, jobs: Arc<Mutex<mpsc::Receiver<Job>>>, committed: Arc<Notify>) {
    loop {
        let batch = {
            // One writer at a time waits for the next command and takes what queued behind
            // it; the others wait for the lock meanwhile.
            let mut jobs = jobs.lock().await;
            let Some(first) = jobs.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            batch
        };
        let (cmds, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|j| (j.cmd, j.reply)).unzip();
        let outcomes = apply(&pool, &cmds).await;
        if outcomes
            .iter()
            .any(|o| matches!(o, Ok(ended) if !ended.is_empty()))
        {
            committed.notify_one();
        }
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            // A caller that went away (its request dropped) needs no answer.
            let _ = reply.send(outcome);
        }
    }
}

/// The outcome of each of `cmds`, in order: together when there are several, else (or when
/// together failed) each alone.
async fn apply(pool: &PgPool, cmds: &[DestroyCommand]) -> Vec<Result<Vec<Session>>> {
    if cmds.len() > 1 {
        match together(pool, cmds).await {
            Ok(outcomes) => return outcomes,
            Err(e) => {
                tracing::debug!(commands = cmds.len(), error = %e, "group commit rolled back; applying each alone");
            }
        }
    }
    let mut outcomes = Vec::with_capacity(cmds.len());
    for cmd in cmds {
        outcomes.push(destroy_alone(pool, cmd).await);
    }
    outcomes
}

/// Applies `cmds` in one transaction; `Err` (nothing kept) when any of them failed other
/// than by a replay, or the transaction did.
async fn together(pool: &PgPool, cmds: &[DestroyCommand]) -> Result<Vec<Result<Vec<Session>>>> {
    let now = now_millis();
    let mut tx = pool.begin().await?;
    let mut outcomes = Vec::with_capacity(cmds.len());
    for cmd in cmds {
        match sessions::destroy(&mut tx, cmd, now).await {
            Err(StoreError::Replayed(jti)) => outcomes.push(Err(StoreError::Replayed(jti))),
            Err(e) => {
                tx.rollback().await?;
                return Err(e);
            }
            Ok(ended) => outcomes.push(Ok(ended)),
        }
    }
    tx.commit().await?;
    Ok(outcomes)
}
