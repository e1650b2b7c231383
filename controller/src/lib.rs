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
pub mod kubernetes;
pub mod lease;
pub mod local;
pub mod metrics;
pub mod provider;
pub mod reconcile;
pub mod standalone;

use std::sync::Arc;

use provider::Provider;

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

/// The providers available to a driver, by `spec.provider` key.
#[derive(Clone, Default)]
pub struct Providers {
    /// `local`: child processes.
    pub local: Option<Arc<local::LocalProvider>>,
    /// `static`: listed endpoints.
    pub fixed: Option<Arc<fixed::StaticProvider>>,
    /// `aws`: EC2.
    pub aws: Option<Arc<dyn Provider>>,
}

impl Providers {
    /// The provider for a `spec.provider` key.
    pub fn get(&self, kind: &str) -> Option<Arc<dyn Provider>> {
        match kind {
            "local" => self.local.clone().map(|p| p as Arc<dyn Provider>),
            "static" => self.fixed.clone().map(|p| p as Arc<dyn Provider>),
            "aws" => self.aws.clone(),
            _ => None,
        }
    }
}
