//! Controller metrics, named like controller-runtime's so existing dashboards carry over.

use prometheus::core::Collector;
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Every controller metric, registered once.
#[derive(Clone)]
pub struct Metrics {
    /// Reconciles by result (`success`, `error`).
    pub reconcile: IntCounterVec,
    /// Reconcile pass duration.
    pub reconcile_duration: Histogram,
    /// EC2 API calls by operation and result code (`ok` or the AWS error code).
    pub ec2_requests: IntCounterVec,
    /// SQS calls of the interruption queue by operation and result code.
    pub sqs_requests: IntCounterVec,
    /// Interruption-queue messages by what they announced (`spot_interruption`,
    /// `rebalance_recommendation`, `scheduled_change`, `state_change`; `ignored` for messages
    /// about nothing fleetlb acts on).
    pub interruption_messages: IntCounterVec,
    /// Instances by cluster and provider state.
    pub instances: IntGaugeVec,
    /// Instances terminated because no object owns them.
    pub orphans_terminated: IntCounter,
    /// 1 while this replica acts on providers (always 1 standalone).
    pub leader: IntGauge,
    /// The autoscaler's instance count, by cluster.
    pub autoscaler_desired: IntGaugeVec,
    /// The autoscaler's signal: requests in flight per instance over its stable window.
    pub autoscaler_inflight: GaugeVec,
    /// Proxies whose load the autoscaler's last reading summed, this one included.
    pub autoscaler_proxies: IntGauge,
    /// Peers missing from the last reading (listed but not answering; 1 when the name did not
    /// resolve). While any is missing no cluster scales down.
    pub autoscaler_peers_missing: IntGauge,
    /// Failed readings of peers counted as missing (see `autoscaler_peers_missing`).
    pub autoscaler_peer_failures: IntCounter,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            reconcile: IntCounterVec::new(
                Opts::new(
                    "fleetlb_controller_reconcile_total",
                    "Reconciles of a BackendCluster, by result.",
                ),
                &["result"],
            )?,
            reconcile_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "fleetlb_controller_reconcile_duration_seconds",
                    "Duration of one reconcile.",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0,
                ]),
            )?,
            ec2_requests: IntCounterVec::new(
                Opts::new(
                    "fleetlb_controller_ec2_requests_total",
                    "EC2 API calls by operation and result code.",
                ),
                &["operation", "code"],
            )?,
            sqs_requests: IntCounterVec::new(
                Opts::new(
                    "fleetlb_controller_sqs_requests_total",
                    "SQS calls of the interruption queue by operation and result code.",
                ),
                &["operation", "code"],
            )?,
            interruption_messages: IntCounterVec::new(
                Opts::new(
                    "fleetlb_controller_interruption_messages_total",
                    "Interruption-queue messages by what they announced (ignored: nothing fleetlb acts on).",
                ),
                &["kind"],
            )?,
            instances: IntGaugeVec::new(
                Opts::new(
                    "fleetlb_controller_instances",
                    "Instances by cluster and provider state.",
                ),
                &["cluster", "state"],
            )?,
            orphans_terminated: IntCounter::new(
                "fleetlb_controller_orphans_terminated_total",
                "Instances terminated because no BackendCluster owns them any more.",
            )?,
            leader: IntGauge::new(
                "fleetlb_controller_leader",
                "1 while this replica is the one acting on providers.",
            )?,
            autoscaler_desired: IntGaugeVec::new(
                Opts::new(
                    "fleetlb_autoscaler_desired_replicas",
                    "Instances the autoscaler wants, by cluster.",
                ),
                &["cluster"],
            )?,
            autoscaler_inflight: GaugeVec::new(
                Opts::new(
                    "fleetlb_autoscaler_inflight_per_instance",
                    "Requests in flight per instance over the autoscaler's stable window.",
                ),
                &["cluster"],
            )?,
            autoscaler_proxies: IntGauge::new(
                "fleetlb_autoscaler_proxies",
                "Proxies whose load the autoscaler's last reading summed, this one included (a peer that missed a reading counts with its last one for 3 s).",
            )?,
            autoscaler_peers_missing: IntGauge::new(
                "fleetlb_autoscaler_peers_missing",
                "Peer proxies missing from the autoscaler's last reading (listed but not answering; 1 when the peers' name did not resolve). While any is missing no cluster scales down.",
            )?,
            autoscaler_peer_failures: IntCounter::new(
                "fleetlb_autoscaler_peer_failures_total",
                "Failed readings (refused, timed out, malformed) of peer proxies that answered within the last 2 minutes, and peer lookups that failed: what made a reading incomplete.",
            )?,
        };
        registry.register(Box::new(m.autoscaler_desired.clone()))?;
        registry.register(Box::new(m.autoscaler_inflight.clone()))?;
        registry.register(Box::new(m.autoscaler_proxies.clone()))?;
        registry.register(Box::new(m.autoscaler_peer_failures.clone()))?;
        registry.register(Box::new(m.autoscaler_peers_missing.clone()))?;
        registry.register(Box::new(m.reconcile.clone()))?;
        registry.register(Box::new(m.reconcile_duration.clone()))?;
        registry.register(Box::new(m.ec2_requests.clone()))?;
        registry.register(Box::new(m.sqs_requests.clone()))?;
        registry.register(Box::new(m.interruption_messages.clone()))?;
        registry.register(Box::new(m.instances.clone()))?;
        registry.register(Box::new(m.orphans_terminated.clone()))?;
        registry.register(Box::new(m.leader.clone()))?;
        Ok(m)
    }

    /// Names of every metric, for checking dashboards and alerts against the code.
    pub fn names(&self) -> Vec<String> {
        let collectors: [&dyn Collector; 13] = [
            &self.autoscaler_peers_missing,
            &self.autoscaler_desired,
            &self.autoscaler_inflight,
            &self.autoscaler_proxies,
            &self.autoscaler_peer_failures,
            &self.reconcile,
            &self.reconcile_duration,
            &self.ec2_requests,
            &self.sqs_requests,
            &self.interruption_messages,
            &self.instances,
            &self.orphans_terminated,
            &self.leader,
        ];
        collectors
            .iter()
            .flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone()))
            .collect()
    }
}
