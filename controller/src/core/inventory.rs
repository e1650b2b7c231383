//! Provider listings shared by every reconcile: one list call per provider kind per
//! `max_age`, for all objects. Kinds are listed concurrently, each under its own lock and its
//! own deadline, so a slow `DescribeInstances` never stalls the reconciles of another kind.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use fleetlb_crds::BackendCluster;
use futures::future::join_all;
use tokio::time::Instant;

use crate::Error;
use crate::error::{ErrorClass, Operation};
use crate::provider::{ClusterKey, Instance, ProviderKind, Providers};

struct Listing {
    at: Instant,
    instances: Arc<Listed>,
}

/// One provider kind's instances, and which of them each object owns (a pass reconciles every
/// object against one listing: finding an object's own by scanning all was O(n^2) per pass).
pub struct Listed {
    all: Vec<Instance>,
    by_owner: std::collections::HashMap<ClusterKey, Vec<usize>>,
}

impl Listed {
    fn new(all: Vec<Instance>) -> Self {
        let mut by_owner: std::collections::HashMap<ClusterKey, Vec<usize>> =
            std::collections::HashMap::new();
        for (i, inst) in all.iter().enumerate() {
            by_owner.entry(inst.owner.clone()).or_default().push(i);
        }
        Self { all, by_owner }
    }

    /// The instances `owner` owns.
    pub fn of(&self, owner: &ClusterKey) -> impl Iterator<Item = &Instance> {
        self.by_owner
            .get(owner)
            .into_iter()
            .flatten()
            .map(|&i| &self.all[i])
    }
}

impl std::ops::Deref for Listed {
    type Target = [Instance];
    fn deref(&self) -> &[Instance] {
        &self.all
    }
}

/// The cache of listings, by provider kind.
pub struct Inventory {
    by_kind: BTreeMap<ProviderKind, tokio::sync::Mutex<Option<Listing>>>,
    max_age: Duration,
    deadline: Duration,
}

impl Inventory {
    /// Listings younger than `max_age` are shared; a listing taking longer than `deadline`
    /// fails as the provider being unavailable.
    pub fn new(max_age: Duration, deadline: Duration) -> Self {
        Self {
            by_kind: ProviderKind::ALL
                .into_iter()
                .map(|k| (k, tokio::sync::Mutex::new(None)))
                .collect(),
            max_age,
            deadline,
        }
    }

    /// Every instance `kind` lists (from a listing at most `max_age` old, or `max_age` of the
    /// inventory when `None`).
    pub async fn get(
        &self,
        kind: ProviderKind,
        providers: &Providers,
        clusters: &[Arc<BackendCluster>],
        max_age: Option<Duration>,
    ) -> Result<Arc<Listed>, Error> {
        let Some(slot) = self.by_kind.get(&kind) else {
            // Every kind has a slot (see `new`).
            return Err(Error::new(
                kind,
                Operation::List,
                ErrorClass::Other,
                "no listing slot",
            ));
        };
        // Held across the call: concurrent reconciles wait for one listing instead of each
        // making their own. Only reconciles of this kind wait.
        let mut cached = slot.lock().await;
        if let Some(l) = cached.as_ref()
            && l.at.elapsed() < max_age.unwrap_or(self.max_age)
        {
            return Ok(l.instances.clone());
        }
        let instances = Arc::new(self.list(kind, providers, clusters).await?);
        *cached = Some(Listing {
            at: Instant::now(),
            instances: instances.clone(),
        });
        Ok(instances)
    }

    /// `kind`'s instances of `clusters`, listed now within the deadline.
    async fn list(
        &self,
        kind: ProviderKind,
        providers: &Providers,
        clusters: &[Arc<BackendCluster>],
    ) -> Result<Listed, Error> {
        let provider = providers.require(kind)?;
        let listed = tokio::time::timeout(self.deadline, provider.list(clusters))
            .await
            .unwrap_or_else(|_| {
                Err(Error::new(
                    kind,
                    Operation::List,
                    ErrorClass::Unavailable,
                    format!(
                        "listing instances did not finish within {}s (timeout)",
                        self.deadline.as_secs()
                    ),
                ))
            });
        match listed {
            Ok(list) => Ok(Listed::new(list)),
            Err(e) => {
                tracing::warn!(provider = %kind, error = %e, "listing instances failed");
                Err(e)
            }
        }
    }

    /// Forgets the listing of `kind` (after a launch or termination).
    pub async fn invalidate(&self, kind: ProviderKind) {
        if let Some(slot) = self.by_kind.get(&kind) {
            *slot.lock().await = None;
        }
    }

    /// This object's instances (every owner UID) from every kind it uses or used (see
    /// [`kinds_of`]), listed concurrently; the first failing kind's error otherwise.
    pub async fn instances_of(
        &self,
        bc: &BackendCluster,
        providers: &Providers,
        clusters: &[Arc<BackendCluster>],
        max_age: Option<Duration>,
    ) -> Result<(Vec<Instance>, BTreeSet<ProviderKind>), Error> {
        let key = ClusterKey::of(bc);
        let kinds = kinds_of(bc);
        // A provider that only lists what specs say (`static`) is asked about this object
        // alone, as it is now: a listing shared with others may predate it (a new object
        // would settle with no instances until its next resync) or its last edit.
        let listings = join_all(kinds.iter().map(|k| {
            let from_spec = providers.get(*k).is_some_and(|p| !p.manages_instances());
            async move {
                if from_spec {
                    let this = [Arc::new(bc.clone())];
                    self.list(*k, providers, &this).await.map(Arc::new)
                } else {
                    self.get(*k, providers, clusters, max_age).await
                }
            }
        }))
        .await;
        let mut mine = Vec::new();
        for listing in listings {
            mine.extend(listing?.of(&key).cloned());
        }
        Ok((mine, kinds))
    }
}

/// The provider kinds `bc` uses (`spec.provider`), used at the last reconcile
/// (`status.provider`), or still has instances of (`status.instances`), so a change of
/// `spec.provider` retires the old kind's instances.
pub fn kinds_of(bc: &BackendCluster) -> BTreeSet<ProviderKind> {
    let mut kinds = BTreeSet::from([ProviderKind::of(&bc.spec.provider)]);
    kinds.extend(
        bc.status
            .as_ref()
            .and_then(|s| s.provider.as_deref())
            .and_then(ProviderKind::parse),
    );
    kinds.extend(
        bc.status
            .iter()
            .flat_map(|s| &s.instances)
            .filter(|i| i.state != "terminated")
            .filter_map(|i| i.provider.as_deref().and_then(ProviderKind::parse)),
    );
    kinds
}
