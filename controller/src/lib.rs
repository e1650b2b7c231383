#![forbid(unsafe_code)]
//! fleetlb's controller: makes the instances of each BackendCluster exist and tells the data
//! plane where they are.
//!
//! - [`reconcile`]: the decision for one object, written once, pure.
//! - [`core`]: everything else both drivers share: per-object state, the provider inventory,
//!   executing a plan (launch, drain, terminate), deletion, conditions and Events, routes with
//!   one conflict rule, the orphan sweep, the `/status` view.
//! - [`standalone`] and [`kubernetes`]: the drivers; each only says where objects come from
//!   and where status and Events go.
//! - [`provider`]: the [`Provider`](provider::Provider) trait and its implementations:
//!   [`provider::aws`] (EC2), [`provider::local`] (child processes), [`provider::endpoints`]
//!   (`static`: listed endpoints).
//! - [`interruption`]: the interruption queue (spot warnings, rebalance recommendations,
//!   scheduled changes, state changes) read by the leader.
//! - [`error`]: provider errors with their class, and condition reasons.

pub mod autoscale;
pub mod core;
pub mod error;
pub mod files;
pub mod iam;
pub mod interruption;
pub mod kubernetes;
pub mod lease;
pub mod metrics;
pub mod provider;
pub mod reconcile;
pub mod standalone;

pub use error::Error;
pub use provider::Providers;
