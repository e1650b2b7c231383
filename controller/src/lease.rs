//! Leader election on a `coordination.k8s.io/v1` Lease, client-go's algorithm: the holder renews
//! every `retry` period; another replica takes over once it has seen the same Lease record,
//! unchanged, for longer than the lease duration (measured on its own clock, so clock skew between
//! nodes does not matter); a holder that cannot renew within `renew_deadline` stops acting on its
//! own, before anyone else can take over. Every write carries the `resourceVersion` it read, so
//! two replicas racing for an expired Lease cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

/// Lease settings (client-go's defaults).
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the controller's own).
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a Lease record stays valid without renewal (15 s).
    pub duration: Duration,
    /// A holder that could not renew for this long stops acting (10 s).
    pub renew_deadline: Duration,
    /// Time between attempts (2 s).
    pub retry: Duration,
}

impl LeaseConfig {
    /// client-go's timings for `identity` on Lease `namespace/name`.
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        Self {
            namespace,
            name,
            identity,
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// Until when this replica may act as leader, on the process's monotonic clock: the last
/// renewal's send time plus the renew deadline. The leader flag alone is not enough: a replica
/// that was frozen (SIGSTOP, a stalled node, a long pause) wakes with every timer due at once,
/// and a reconcile may run before the elector does; the term has already ended by the clock.
#[derive(Clone, Debug)]
pub struct Term(std::sync::Arc<TermClock>);

#[derive(Debug)]
struct TermClock {
    base: std::time::Instant,
    /// Nanoseconds after `base`; `u64::MAX`: no end (no leader election).
    until: std::sync::atomic::AtomicU64,
}

impl Term {
    /// A term that never ends (a single replica without leader election, tests).
    pub fn unbounded() -> Self {
        Self::starting_at(u64::MAX)
    }

    /// A term not begun yet: valid once a renewal extends it.
    pub fn ended() -> Self {
        Self::starting_at(0)
    }

    fn starting_at(until: u64) -> Self {
        Self(std::sync::Arc::new(TermClock {
            base: std::time::Instant::now(),
            until: std::sync::atomic::AtomicU64::new(until),
        }))
    }

    /// Whether this replica may still act as leader by the clock.
    pub fn valid(&self) -> bool {
        let now = self.0.base.elapsed().as_nanos();
        now < u128::from(self.0.until.load(std::sync::atomic::Ordering::Acquire))
    }

    fn extend_to(&self, until: std::time::Instant) {
        let nanos = until.saturating_duration_since(self.0.base).as_nanos();
        self.0.until.store(
            u64::try_from(nanos).unwrap_or(u64::MAX - 1),
            std::sync::atomic::Ordering::Release,
        );
    }

    fn end(&self) {
        self.0.until.store(0, std::sync::atomic::Ordering::Release);
    }
}

/// One replica's view of the Lease.
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    /// The record last seen (resourceVersion) and when it was first seen.
    observed: Option<(String, Instant)>,
    /// When this replica last wrote the Lease as holder.
    renewed: Option<Instant>,
    /// Until when this replica may act, by the clock (see [`Term`]).
    term: Term,
}

impl Elector {
    /// An elector for `cfg` through `api` (namespaced to `cfg.namespace`).
    pub fn new(api: Api<Lease>, cfg: LeaseConfig) -> Self {
        Self {
            api,
            cfg,
            observed: None,
            renewed: None,
            term: Term::ended(),
        }
    }

    /// This replica's term as leader, for everything that acts only while it leads.
    pub fn term(&self) -> Term {
        self.term.clone()
    }

    /// One attempt to acquire or renew; returns whether this replica may act now.
    ///
    /// The attempt is bounded: a leader's by what is left of its renew deadline (so a GET or PUT
    /// that never answers ends leadership exactly when the deadline passes, before any other
    /// replica can take over), a follower's by the renew deadline.
    pub async fn step(&mut self) -> bool {
        let budget = match self.renewed {
            Some(t) => self.cfg.renew_deadline.saturating_sub(t.elapsed()),
            None => self.cfg.renew_deadline,
        };
        // A renewal counts from when it was sent, not from when its answer came: the record
        // may be committed long before a slow answer arrives, and other replicas measure the
        // lease from the record.
        let sent = Instant::now();
        let sent_clock = std::time::Instant::now();
        let attempt = tokio::time::timeout(budget, self.try_acquire_or_renew()).await;
        let result = match attempt {
            Ok(r) => r,
            Err(_) => {
                self.term.end();
                let held = self.renewed.take().is_some();
                tracing::warn!(
                    deadline = ?self.cfg.renew_deadline,
                    was_leader = held,
                    "leader election: the API server did not answer within the renew deadline"
                );
                return false;
            }
        };
        match result {
            Ok(true) => {
                self.renewed = Some(sent);
                self.term.extend_to(sent_clock + self.cfg.renew_deadline);
                true
            }
            Ok(false) => {
                self.renewed = None;
                self.term.end();
                false
            }
            Err(e) => {
                // The API server is unreachable or refused: keep acting only while the last
                // renewal is recent enough that nobody else can have taken over.
                let still = self
                    .renewed
                    .is_some_and(|t| t.elapsed() < self.cfg.renew_deadline);
                if !still {
                    self.term.end();
                }
                tracing::warn!(error = %e, still_leader = still, "leader election: cannot reach the Lease");
                still
            }
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let me = self.cfg.identity.as_str();
        let secs = i32::try_from(self.cfg.duration.as_secs()).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.to_string()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder == me {
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(secs);
            return conflict_is_false(self.replace(&lease).await);
        }
        if self.observed.as_ref().is_none_or(|(seen, _)| *seen != rv) {
            self.observed = Some((rv, Instant::now()));
        }
        let valid_for = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.cfg.duration, Duration::from_secs);
        let expired = holder.is_empty()
            || self
                .observed
                .as_ref()
                .is_some_and(|(_, since)| since.elapsed() > valid_for);
        if !expired {
            return Ok(false);
        }
        tracing::info!(previous = %holder, "leader election: Lease expired; taking over");
        spec.holder_identity = Some(me.to_string());
        spec.acquire_time = Some(MicroTime(now));
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        conflict_is_false(self.replace(&lease).await)
    }

    async fn replace(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        self.api
            .replace(&self.cfg.name, &PostParams::default(), lease)
            .await
    }

    /// Gives the Lease up (on shutdown) so another replica takes over at once instead of
    /// waiting for it to expire.
    pub async fn release(&mut self) {
        if self.renewed.take().is_none() {
            return;
        }
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self.replace(&lease).await {
            Ok(_) => tracing::info!("leader election: Lease released"),
            Err(e) => tracing::warn!(error = %e, "leader election: releasing the Lease failed"),
        }
    }
}

fn conflict_is_false(r: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match r {
        Ok(_) => Ok(true),
        // Someone else wrote the Lease between our read and write (409), or created it first.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs the election until `shutdown`, publishing whether this replica leads; releases the
/// Lease on the way out.
pub async fn run(
    mut elector: Elector,
    leader: watch::Sender<bool>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let retry = elector.cfg.retry;
    loop {
        let now = elector.step().await;
        leader.send_if_modified(|cur| {
            if *cur == now {
                return false;
            }
            if now {
                tracing::info!(identity = %elector.cfg.identity, "leader election: this replica leads");
            } else {
                tracing::warn!(identity = %elector.cfg.identity, "leader election: this replica stopped leading");
            }
            *cur = now;
            true
        });
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = &mut shutdown => break,
        }
    }
    leader.send_replace(false);
    elector.term.end();
    let deadline = elector.cfg.renew_deadline;
    if tokio::time::timeout(deadline, elector.release())
        .await
        .is_err()
    {
        tracing::warn!("leader election: releasing the Lease timed out; it expires on its own");
    }
}

#[cfg(test)]
mod term_tests {
    use super::Term;
    use std::time::{Duration, Instant};

    #[test]
    fn a_term_is_valid_only_until_its_end_by_the_clock() {
        assert!(Term::unbounded().valid());
        let t = Term::ended();
        assert!(!t.valid(), "valid before any renewal");
        t.extend_to(Instant::now() + Duration::from_secs(3600));
        assert!(t.valid());
        // A renewal whose deadline has passed (a replica frozen past it) is no term at all.
        t.extend_to(Instant::now() - Duration::from_millis(1));
        assert!(!t.valid());
        t.extend_to(Instant::now() + Duration::from_secs(3600));
        t.end();
        assert!(!t.valid());
    }
}
