//! The locks a writer's batch holds on the shared store, so that batches of several
//! replicas run side by side and never on the same member at once.
//!
//! A batch runs in one of two kinds:
//! - **exclusive**: it holds the writers' lock exclusively, so no other batch runs beside
//!   it and nothing else needs locking. Jobs that run once (operators' writes, replays,
//!   prunes, erasures, reconciliation records) and jobs that reached something only an
//!   exclusive batch may do (a merge of two members) run in one;
//! - **keyed**: it holds the writers' lock shared, beside other keyed batches, and locks
//!   (`pg_advisory_xact_lock`, held to the commit) every record its jobs read or write by:
//!   a member, and each key a job looks a record up by (a delivery's idempotency key, a
//!   customer id, an email, a membership key, a payment reference, a park key) — a key
//!   locked even where nothing is stored under it yet, so that two jobs cannot both find
//!   it free and create it twice.
//!
//! A keyed batch first takes what its jobs are known to need (their hints, and what an
//! earlier run of a deferred job took) without waiting: a job needing one another batch
//! holds is set aside for a later batch, and the others run now. Only when none can run
//! (or a job was set aside too often) does the batch wait for them, in a transaction
//! holding nothing else yet, sorted by id: sorted acquisition cannot deadlock. What a job reaches beyond that (the member a customer id turns out to
//! name) is taken with `pg_try_advisory_xact_lock` — a job never waits for a lock mid-batch,
//! so no cycle of waits can form either. A record taken after it was read is read again,
//! until what was read is what is held. A job that finds one held by another batch is
//! rolled back to its savepoint and runs again in the writer's next batch, which takes
//! everything the failed run reached before it starts. A job that would hold more locks
//! than `MOST_JOB_LOCKS` (or its batch more than `MOST_BATCH_LOCKS`), or that finds the
//! server's lock table full, runs again in an exclusive batch. So is what a batch takes at
//! its start: at most `MOST_BATCH_LOCKS` (jobs past it wait for the next batch), and a lock
//! table found full while taking it sends the batch's jobs to run alone.
//!
//! Every read and write of a job is made under a lock held from before it to the commit:
//! strict two-phase locking, so the batches of all replicas commit in an order in which
//! each saw what the ones before it wrote, as one writer's batches do.

use std::collections::{HashMap, HashSet};

/// Most record locks one job takes in a keyed batch: one that reaches more (a member deleted
/// at the provider with thousands of memberships, each a record of its own) runs again
/// alone, where it takes none. PostgreSQL's shared lock table is finite
/// (`max_locks_per_transaction` × connections: some thousands by default) and shared by
/// every session of the server; a job locking without bound would fill it, fail (`out of
/// shared memory`) on every run, and make every other session's locks fail meanwhile.
pub(super) const MOST_JOB_LOCKS: usize = 256;

/// Most record locks a keyed batch holds: past them, a job that reaches one more runs
/// again alone, so that a batch of many large jobs cannot fill the table either.
pub(super) const MOST_BATCH_LOCKS: usize = 1024;

/// What one batch holds.
pub(super) struct Locks {
    /// Holds the writers' lock exclusively: every claim is granted without locking.
    pub(super) exclusive: bool,
    held: HashSet<i64>,
    /// The member of each membership read or written in this batch.
    owners: HashMap<String, String>,
    /// The email of each member read or written in this batch (`None`: it has none).
    emails: HashMap<String, Option<String>>,
    /// Memberships whose member's email a search for parked events took (the email a
    /// member takes later in the batch is taken by the save that gives it).
    searched: HashSet<String>,
    pub(super) job: JobLocks,
}

/// What the running job claimed.
#[derive(Default)]
pub(super) struct JobLocks {
    /// Every lock id claimed (held already, taken, or found held by another batch).
    pub(super) claimed: Vec<i64>,
    /// Those taken by this job (not held by the batch before it).
    taken: Vec<i64>,
    /// One was held by another batch: the job runs again in the next batch.
    pub(super) contended: bool,
    /// It reached something only an exclusive batch may do.
    pub(super) needs_exclusive: bool,
}

impl Locks {
    pub(super) fn new(exclusive: bool, held: impl IntoIterator<Item = i64>) -> Locks {
        Locks {
            exclusive,
            held: held.into_iter().collect(),
            owners: HashMap::new(),
            emails: HashMap::new(),
            searched: HashSet::new(),
            job: JobLocks::default(),
        }
    }

    pub(super) fn start_job(&mut self) {
        self.job = JobLocks::default();
    }

    /// After the job: when its savepoint was rolled back, the locks it took may have gone
    /// with it and what it learned of owners may not hold; both are forgotten.
    pub(super) fn end_job(&mut self, rolled_back: bool) -> JobLocks {
        let job = std::mem::take(&mut self.job);
        if rolled_back {
            for id in &job.taken {
                self.held.remove(id);
            }
            self.owners.clear();
            self.emails.clear();
            self.searched.clear();
        }
        job
    }

    /// Whether `id` needs taking: `Err` when the job may go no further.
    pub(super) fn wants(&mut self, id: i64) -> Result<bool, super::Error> {
        if self.exclusive {
            return Ok(false);
        }
        if self.job.contended || self.job.needs_exclusive {
            return Err(super::Error::Contended);
        }
        let wanted = !self.held.contains(&id);
        if wanted && (self.job.taken.len() >= MOST_JOB_LOCKS || self.held.len() >= MOST_BATCH_LOCKS) {
            return self.exclusive_only().map(|()| false);
        }
        self.job.claimed.push(id);
        Ok(wanted)
    }

    /// The try-lock's answer for `id`.
    pub(super) fn got(&mut self, id: i64, taken: bool) -> Result<(), super::Error> {
        if taken {
            self.held.insert(id);
            self.job.taken.push(id);
            Ok(())
        } else {
            self.job.contended = true;
            Err(super::Error::Contended)
        }
    }

    /// A job reached what only an exclusive batch may do.
    pub(super) fn exclusive_only(&mut self) -> Result<(), super::Error> {
        if self.exclusive {
            return Ok(());
        }
        self.job.needs_exclusive = true;
        Err(super::Error::Contended)
    }

    /// Whether a search for the events parked for membership `id` was locked in this batch.
    pub(super) fn searched(&self, id: &str) -> bool {
        self.exclusive || self.searched.contains(id)
    }

    pub(super) fn note_searched(&mut self, id: &str) {
        self.searched.insert(id.to_string());
    }

    /// Member `id`'s email as read or written in this batch, if it was.
    pub(super) fn email_of(&self, id: &str) -> Option<Option<&str>> {
        self.emails.get(id).map(Option::as_deref)
    }

    pub(super) fn note_email(&mut self, id: &str, email: Option<&str>) {
        if !self.exclusive {
            self.emails.insert(id.to_string(), email.map(str::to_string));
        }
    }

    pub(super) fn owner(&self, membership_id: &str) -> Option<&str> {
        self.owners.get(membership_id).map(String::as_str)
    }

    /// Membership `membership_id` is member `member_id`'s: a search for its parked events
    /// locked under another member is locked again.
    pub(super) fn note_owner(&mut self, membership_id: &str, member_id: &str) {
        if self.exclusive {
            return;
        }
        if let Some(before) = self.owners.insert(membership_id.to_string(), member_id.to_string()) {
            if before != member_id {
                self.searched.remove(membership_id);
            }
        }
    }
}
