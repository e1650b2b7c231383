//! The orphan sweep: instances of this install that no object owns (a launch whose object was
//! deleted meanwhile, an object removed while fleetlb was down) are terminated once older than
//! the grace period. The Kubernetes driver sweeps every configured provider that launches
//! instances; the standalone driver only the kinds its objects have used since it started (so
//! instances of a kind no object in the directory uses any more, left by a deletion while
//! fleetlb was down, are not swept: delete them or restore their object).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use fleetlb_crds::BackendCluster;
use futures::future::BoxFuture;

use super::Core;
use crate::provider::{ClusterKey, Instance, ProviderKind};

/// Asks the source of objects whether `key` exists now and with which UID (the Kubernetes
/// driver asks the API server, since its cache can lag); an error means "cannot tell".
pub type Confirm<'a> =
    dyn Fn(&ClusterKey) -> BoxFuture<'a, Result<Option<String>, String>> + Send + Sync + 'a;

impl Core {
    /// Terminates the instances no object in `objects` owns (by namespace/name and UID) that
    /// are older than the grace period, once `confirm` agrees their owner is gone. Sweeps the
    /// providers of `kinds` (every configured one when `None`). Returns how many were
    /// terminated.
    pub async fn sweep(
        &self,
        objects: &[Arc<BackendCluster>],
        kinds: Option<&BTreeSet<ProviderKind>>,
        confirm: &Confirm<'_>,
    ) -> usize {
        let owners: HashSet<(ClusterKey, String)> = objects
            .iter()
            .map(|o| {
                (
                    ClusterKey::of(o),
                    o.metadata.uid.clone().unwrap_or_default(),
                )
            })
            .collect();
        let mut swept = 0;
        for kind in ProviderKind::ALL {
            if kinds.is_some_and(|k| !k.contains(&kind)) {
                continue;
            }
            let Some(p) = self.providers.get(kind).filter(|p| p.manages_instances()) else {
                continue;
            };
            let Ok(listing) = self
                .inventory
                .get(kind, &self.providers, objects, None)
                .await
            else {
                continue;
            };
            let candidates: Vec<&Instance> = listing
                .iter()
                .filter(|i| {
                    i.state.needs_terminate()
                        && !owners.contains(&(i.owner.clone(), i.owner_uid.clone()))
                        && i.launched_at
                            .elapsed()
                            .is_ok_and(|age| age >= self.cfg.orphan_grace)
                })
                .collect();
            let mut orphans = Vec::new();
            let mut checked: HashMap<ClusterKey, Option<String>> = HashMap::new();
            for i in candidates {
                let uid = match checked.get(&i.owner) {
                    Some(uid) => uid.clone(),
                    None => match confirm(&i.owner).await {
                        Ok(uid) => {
                            checked.insert(i.owner.clone(), uid.clone());
                            uid
                        }
                        Err(e) => {
                            // Cannot tell: terminate nothing more this time (a hung source
                            // would cost a timeout per instance otherwise).
                            tracing::warn!(cluster = %i.owner, error = %e, "orphan sweep: cannot confirm the owner is gone; sweeping later");
                            break;
                        }
                    },
                };
                if uid.as_deref() != Some(i.owner_uid.as_str()) {
                    tracing::warn!(cluster = %i.owner, id = %i.id, uid = %i.owner_uid, "orphan instance: no BackendCluster owns it; terminating");
                    orphans.push(i.id.clone());
                }
            }
            if orphans.is_empty() {
                continue;
            }
            match p.terminate(&orphans).await {
                Ok(()) => {
                    self.metrics.orphans_terminated.inc_by(orphans.len() as u64);
                    swept += orphans.len();
                    self.inventory.invalidate(kind).await;
                }
                Err(e) => {
                    tracing::warn!(provider = %kind, error = %e, "orphan sweep: terminating failed; will retry")
                }
            }
        }
        swept
    }
}
