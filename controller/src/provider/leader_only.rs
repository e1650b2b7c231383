//! Providers gated on leadership.

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{Instance, LaunchRequest, Provider, ProviderKind};
use crate::Error;
use crate::error::{ErrorClass, Operation};

/// A provider that acts only while this replica leads: every launch, termination and release
/// re-reads the leader flag immediately before calling the provider, so a replica that lost the
/// Lease mid-reconcile (its renewal hung past the renew deadline) makes no further EC2 call,
/// whatever its reconcile had already decided. Listing is allowed while the term has not run
/// out by the clock (see [`crate::lease::Term`]).
pub struct LeaderOnly {
    inner: std::sync::Arc<dyn Provider>,
    leader: watch::Receiver<bool>,
    term: crate::lease::Term,
}

impl LeaderOnly {
    /// Wraps `inner`, gated on `leader` and, by the clock, on `term`.
    pub fn new(
        inner: std::sync::Arc<dyn Provider>,
        leader: watch::Receiver<bool>,
        term: crate::lease::Term,
    ) -> Self {
        Self {
            inner,
            leader,
            term,
        }
    }

    fn check(&self, operation: Operation) -> Result<(), Error> {
        if *self.leader.borrow() && self.term.valid() {
            Ok(())
        } else {
            Err(Error::new(
                self.inner.kind(),
                operation,
                ErrorClass::NotLeader,
                "NotLeader: this replica no longer holds the leader-election Lease",
            ))
        }
    }
}

impl Provider for LeaderOnly {
    fn kind(&self) -> ProviderKind {
        self.inner.kind()
    }

    fn list<'a>(
        &'a self,
        clusters: &'a [std::sync::Arc<fleetlb_crds::BackendCluster>],
    ) -> BoxFuture<'a, Result<Vec<Instance>, Error>> {
        // Listing changes nothing, but a replica whose term has run out by the clock (frozen,
        // then resumed with its reconcile mid-way) does not call the provider at all.
        if !self.term.valid() {
            let e = Error::new(
                self.inner.kind(),
                Operation::List,
                ErrorClass::NotLeader,
                "NotLeader: this replica's leader-election term has run out",
            );
            return Box::pin(async move { Err(e) });
        }
        self.inner.list(clusters)
    }

    fn launch<'a>(
        &'a self,
        req: &'a LaunchRequest,
    ) -> BoxFuture<'a, Result<crate::provider::Launch, Error>> {
        match self.check(Operation::Launch) {
            Ok(()) => self.inner.launch(req),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn terminate<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), Error>> {
        match self.check(Operation::Terminate) {
            Ok(()) => self.inner.terminate(ids),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn release<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), Error>> {
        match self.check(Operation::Release) {
            Ok(()) => self.inner.release(ids),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn spot_interrupted(&self, instance: &crate::provider::Instance, why: &str) {
        self.inner.spot_interrupted(instance, why);
    }

    fn manages_instances(&self) -> bool {
        self.inner.manages_instances()
    }

    fn token_scope(&self) -> &str {
        self.inner.token_scope()
    }
}
