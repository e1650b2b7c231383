#![forbid(unsafe_code)]
//! fleetlb's controller: makes the instances of each BackendCluster exist and tells the data
//! plane where they are.
//!
//! - [`reconcile`]: the decision logic, written once, pure.
//! - [`provider`]: the [`Provider`](provider::Provider) trait; [`local`], [`fixed`] (`static`)
//!   implementations.
//! - [`standalone`]: the driver that reads BackendCluster YAML from a directory.
//! - [`backend`]: the demo backend that `local` instances run.

pub mod aws;
pub mod backend;
pub mod execute;
pub mod files;
pub mod fixed;
pub mod iam;
pub mod kubernetes;
pub mod lease;
pub mod local;
pub mod metrics;
pub mod provider;
pub mod reconcile;
pub mod standalone;

use std::sync::Arc;

use provider::{Provider, ProviderKind};

/// Controller errors, each naming what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A provider call failed.
    #[error("{provider} provider: {operation} failed: {message}")]
    Provider {
        /// `aws`, `local` or `static`.
        provider: &'static str,
        /// The operation (`list`, `launch`, `terminate`).
        operation: &'static str,
        /// What went wrong.
        message: String,
    },
}

/// The providers available to a driver, by `spec.provider` kind.
#[derive(Clone, Default)]
pub struct Providers {
    /// `local`: child processes.
    pub local: Option<Arc<dyn Provider>>,
    /// `static`: listed endpoints.
    pub fixed: Option<Arc<dyn Provider>>,
    /// `aws`: EC2.
    pub aws: Option<Arc<dyn Provider>>,
}

impl Providers {
    /// The provider of `kind`, if this process has one.
    pub fn get(&self, kind: ProviderKind) -> Option<Arc<dyn Provider>> {
        match kind {
            ProviderKind::Local => self.local.clone(),
            ProviderKind::Static => self.fixed.clone(),
            ProviderKind::Aws => self.aws.clone(),
        }
    }

    /// The same providers, each refusing to launch, terminate or release unless `leader` says
    /// this replica leads at the moment of the call (see [`lease::LeaderOnly`]).
    pub fn leader_only(self, leader: tokio::sync::watch::Receiver<bool>) -> Self {
        let wrap = |p: Option<Arc<dyn Provider>>| {
            p.map(|inner| {
                Arc::new(lease::LeaderOnly::new(inner, leader.clone())) as Arc<dyn Provider>
            })
        };
        Self {
            local: wrap(self.local),
            fixed: wrap(self.fixed),
            aws: wrap(self.aws),
        }
    }
}
