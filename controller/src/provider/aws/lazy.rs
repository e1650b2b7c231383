//! The aws provider, configured on first use.

use std::sync::Arc;

use fleetlb_crds::BackendCluster;
use futures::FutureExt;
use futures::future::BoxFuture;

use super::AwsProvider;
use crate::Error;
use crate::metrics::Metrics;
use crate::provider::{Instance, Launch, LaunchRequest, Provider, ProviderKind};

/// An [`AwsProvider`] built on first use, so a process without `aws` clusters never loads AWS
/// configuration (which would look for credentials and query the instance metadata service).
pub struct LazyAwsProvider {
    endpoint: Option<String>,
    controller_id: String,
    metrics: Metrics,
    leader: Option<tokio::sync::watch::Receiver<bool>>,
    cell: tokio::sync::OnceCell<AwsProvider>,
}

impl LazyAwsProvider {
    /// See [`AwsProvider::from_env`].
    pub fn new(
        endpoint: Option<String>,
        controller_id: String,
        metrics: Metrics,
        leader: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Self {
        Self {
            endpoint,
            controller_id,
            metrics,
            leader,
            cell: tokio::sync::OnceCell::new(),
        }
    }

    async fn get(&self) -> &AwsProvider {
        self.cell
            .get_or_init(|| {
                AwsProvider::from_env(
                    self.endpoint.clone(),
                    self.controller_id.clone(),
                    self.metrics.clone(),
                    self.leader.clone(),
                )
            })
            .await
    }
}

impl Provider for LazyAwsProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Aws
    }

    fn token_scope(&self) -> &str {
        &self.controller_id
    }

    fn list<'a>(
        &'a self,
        clusters: &'a [Arc<BackendCluster>],
    ) -> BoxFuture<'a, Result<Vec<Instance>, Error>> {
        async move { self.get().await.list(clusters).await }.boxed()
    }

    fn launch<'a>(&'a self, req: &'a LaunchRequest) -> BoxFuture<'a, Result<Launch, Error>> {
        async move { self.get().await.launch(req).await }.boxed()
    }

    fn terminate<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), Error>> {
        async move { self.get().await.terminate(ids).await }.boxed()
    }

    fn release<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), Error>> {
        async move { self.get().await.release(ids).await }.boxed()
    }

    fn spot_interrupted(&self, instance: &Instance, why: &str) {
        // Only instances it listed are interrupted: it is configured by then.
        if let Some(p) = self.cell.get() {
            p.spot_interrupted(instance, why);
        }
    }
}
