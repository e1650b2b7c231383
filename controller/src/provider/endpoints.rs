//! The `static` provider: endpoints listed in the spec, balanced but never launched.
//!
//! Each listed `host:port` is one always-`running` instance with a stable id derived from the
//! address (`s-<hash>`). Host names are resolved on every reconcile pass (first address wins);
//! a name that does not resolve yields an instance without an address, which never receives
//! traffic and shows up in status.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use fleetlb_crds::{BackendCluster, ProviderSpec};
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::Error;
use crate::error::{ErrorClass, Operation};
use crate::provider::{
    ClusterKey, Instance, InstanceState, LaunchRequest, Provider, ProviderKind, fnv64, spec_hash,
};

/// Derives instances from `spec.provider.static.endpoints`.
#[derive(Default)]
pub struct EndpointsProvider;

impl Provider for EndpointsProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Static
    }

    fn list<'a>(
        &'a self,
        clusters: &'a [Arc<BackendCluster>],
    ) -> BoxFuture<'a, Result<Vec<Instance>, Error>> {
        async move {
            let mut out = Vec::new();
            for bc in clusters {
                let ProviderSpec::Static(st) = &bc.spec.provider else {
                    continue;
                };
                let owner = ClusterKey::of(bc);
                let hash = spec_hash(bc);
                for (slot, ep) in st.endpoints.iter().enumerate() {
                    let address = match ep.parse::<SocketAddr>() {
                        Ok(a) => Some(a),
                        Err(_) => tokio::net::lookup_host(ep.as_str())
                            .await
                            .ok()
                            .and_then(|mut it| it.next()),
                    };
                    out.push(Instance {
                        id: format!("s-{:012x}", fnv64(ep.as_bytes()) & 0xffff_ffff_ffff),
                        owner: owner.clone(),
                        owner_uid: bc.metadata.uid.clone().unwrap_or_default(),
                        slot: slot as u32,
                        attempt: 0,
                        address,
                        state: InstanceState::Running,
                        instance_type: bc.spec.instance_types_joined(),
                        spec_hash: hash.clone(),
                        launched_at: SystemTime::UNIX_EPOCH,
                        launched_as: None,
                        client_token: None,
                        provider: ProviderKind::Static,
                    });
                }
            }
            Ok(out)
        }
        .boxed()
    }

    fn launch<'a>(
        &'a self,
        req: &'a LaunchRequest,
    ) -> BoxFuture<'a, Result<crate::provider::Launch, Error>> {
        async move {
            Err(Error::new(
                ProviderKind::Static,
                Operation::Launch,
                ErrorClass::Invalid,
                format!("{}: static endpoints are listed, not launched", req.owner),
            ))
        }
        .boxed()
    }

    fn terminate<'a>(&'a self, _ids: &'a [String]) -> BoxFuture<'a, Result<(), Error>> {
        async move { Ok(()) }.boxed()
    }

    fn manages_instances(&self) -> bool {
        false
    }
}
