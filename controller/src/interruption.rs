//! Early notice that an instance is going away, read from an SQS queue the way Karpenter's
//! interruption handling reads it (`--interruption-queue`).
//!
//! EventBridge rules send four kinds of event to one queue (docs/concepts/capacity.md shows
//! them): the EC2 Spot Instance Interruption Warning (the instance is reclaimed two minutes
//! later), the EC2 Instance Rebalance Recommendation (a spot instance at elevated risk), the
//! AWS Health scheduled changes of EC2 (retirement, maintenance), and EC2 Instance
//! State-change Notifications (stopping, stopped, shutting-down, terminated).
//!
//! The leader's [`run`] receives them (long polling) and leaves what they say in [`Notices`];
//! the next reconcile of the owning object takes each named instance out of the endpoint set
//! at once, as a stopped one (in-flight requests finish; every proxy replica follows the
//! status), and launches its replacement in the same reconcile. Nothing waits for AWS to
//! reclaim the instance. A message is deleted only once what it asked for is done (the
//! instance is shutting down or gone, or was never fleetlb's): a controller that dies before
//! that gets the message again from the queue, so the notice is never lost.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::error::ProvideErrorMetadata;
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::provider::InstanceState;

/// What a message announced about one instance, least urgent first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `EC2 Instance Rebalance Recommendation`: a spot instance at elevated risk of
    /// interruption.
    RebalanceRecommendation,
    /// An `AWS Health Event` of category `scheduledChange` for EC2 (a scheduled retirement,
    /// reboot or maintenance).
    ScheduledChange,
    /// `EC2 Instance State-change Notification` to stopping, stopped, shutting-down or
    /// terminated.
    StateChange,
    /// `EC2 Spot Instance Interruption Warning`: reclaimed two minutes later.
    SpotInterruption,
}

impl Kind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RebalanceRecommendation => "rebalance_recommendation",
            Kind::ScheduledChange => "scheduled_change",
            Kind::StateChange => "state_change",
            Kind::SpotInterruption => "spot_interruption",
        }
    }

    /// In words, for Events and logs.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::RebalanceRecommendation => "an EC2 rebalance recommendation",
            Kind::ScheduledChange => "a scheduled change (AWS Health)",
            Kind::StateChange => "a state change to stopping or terminating",
            Kind::SpotInterruption => "a spot interruption warning",
        }
    }
}

/// The instances one message (an EventBridge event) names, with what it says of them; empty
/// when it is nothing fleetlb acts on (another kind of event, a state change to `pending` or
/// `running`, a health event of another service or category, not an event at all).
pub fn parse(body: &str) -> Vec<(String, Kind)> {
    let Ok(event) = serde_json::from_str::<Value>(body) else {
        return Vec::new();
    };
    let detail = &event["detail"];
    let one = |kind| {
        detail["instance-id"]
            .as_str()
            .filter(|id| is_instance_id(id))
            .map(|id| vec![(id.to_string(), kind)])
            .unwrap_or_default()
    };
    match (event["source"].as_str(), event["detail-type"].as_str()) {
        (Some("aws.ec2"), Some("EC2 Spot Instance Interruption Warning")) => {
            one(Kind::SpotInterruption)
        }
        (Some("aws.ec2"), Some("EC2 Instance Rebalance Recommendation")) => {
            one(Kind::RebalanceRecommendation)
        }
        (Some("aws.ec2"), Some("EC2 Instance State-change Notification")) => {
            match detail["state"].as_str() {
                Some("stopping" | "stopped" | "shutting-down" | "terminated") => {
                    one(Kind::StateChange)
                }
                _ => Vec::new(),
            }
        }
        // A closed event is one AWS re-sends after the change: nothing more to do.
        (Some("aws.health"), Some("AWS Health Event"))
            if detail["service"] == "EC2"
                && detail["eventTypeCategory"] == "scheduledChange"
                && detail["statusCode"].as_str().is_none_or(|s| s != "closed") =>
        {
            detail["affectedEntities"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["entityValue"].as_str())
                .filter(|id| is_instance_id(id))
                .map(|id| (id.to_string(), Kind::ScheduledChange))
                .collect()
        }
        _ => Vec::new(),
    }
}

/// `i-` and 8 to 17 hex digits, as EC2 names instances.
fn is_instance_id(id: &str) -> bool {
    id.strip_prefix("i-").is_some_and(|hex| {
        (8..=17).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// One message as received: its id and the receipt handle that deletes it (the latest one:
/// a message received again has a new handle, and only that one deletes it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// SQS's message id.
    pub message_id: String,
    /// The receipt handle of its latest receipt.
    pub handle: String,
}

/// What the queue said about one instance.
#[derive(Debug)]
struct Notice {
    kind: Kind,
    since: Instant,
    /// The messages that named it (by message id).
    messages: HashSet<String>,
}

#[derive(Debug, Default)]
struct Inner {
    by_instance: HashMap<String, Notice>,
    /// Receipt handles of messages some notice still waits on, by message id.
    handles: HashMap<String, String>,
    /// Instances named since the drivers last asked (see [`Notices::take_fresh`]).
    fresh: Vec<String>,
    /// Messages done with, to delete.
    done: Vec<Receipt>,
}

/// What the interruption queue said and fleetlb has not finished acting on, shared by the
/// poller ([`run`]) and the core.
#[derive(Debug, Default)]
pub struct Notices {
    inner: Mutex<Inner>,
    changed: Notify,
    deletable: Notify,
}

/// At most this many instances wait with a notice; the poller receives no more meanwhile
/// (the messages wait in the queue).
pub const MAX_NOTICES: usize = 10_000;

/// A notice of an instance no listing shows is done once it is this old: the listing the
/// core settles from (at most a second old, bounded by the list deadline) was made after the
/// notice arrived, with time to spare for DescribeInstances' eventual consistency.
const UNKNOWN_AFTER: Duration = Duration::from_secs(10);

impl Notices {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every map here stays consistent between statements, also after a panic elsewhere.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one received message naming `instances` (see [`parse`]); a message naming
    /// none is done at once. Returns false for a message received again (its visibility
    /// timeout ended while its instance drains): only its receipt handle is new.
    pub fn record(&self, receipt: Receipt, instances: &[(String, Kind)]) -> bool {
        let mut inner = self.lock();
        if instances.is_empty() {
            inner.done.push(receipt);
            drop(inner);
            self.deletable.notify_one();
            return true;
        }
        if let Some(handle) = inner.handles.get_mut(&receipt.message_id) {
            *handle = receipt.handle;
            return false;
        }
        for (id, kind) in instances {
            let notice = inner
                .by_instance
                .entry(id.clone())
                .or_insert_with(|| Notice {
                    kind: *kind,
                    since: Instant::now(),
                    messages: HashSet::new(),
                });
            notice.kind = notice.kind.max(*kind);
            notice.messages.insert(receipt.message_id.clone());
            if inner.fresh.len() < MAX_NOTICES {
                inner.fresh.push(id.clone());
            }
        }
        inner.handles.insert(receipt.message_id, receipt.handle);
        drop(inner);
        self.changed.notify_one();
        true
    }

    /// Puts back instances [`Notices::take_fresh`] gave out that could not be acted on yet,
    /// for the next message to take along (without waking anyone: a failing listing is not
    /// retried in a loop; the owners' resync acts on the notices meanwhile).
    pub fn refresh(&self, ids: Vec<String>) {
        let mut inner = self.lock();
        for id in ids {
            if inner.fresh.len() < MAX_NOTICES && inner.by_instance.contains_key(&id) {
                inner.fresh.push(id);
            }
        }
    }

    /// The instances with a notice, and the most urgent thing said of each.
    pub fn interrupted(&self) -> HashMap<String, Kind> {
        self.lock()
            .by_instance
            .iter()
            .map(|(id, n)| (id.clone(), n.kind))
            .collect()
    }

    /// How many instances wait with a notice.
    pub fn len(&self) -> usize {
        self.lock().by_instance.len()
    }

    /// Whether no instance waits with a notice.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes [`Notices::changed`] (a retry of what [`Notices::refresh`] put back).
    pub fn wake(&self) {
        self.changed.notify_one();
    }

    /// Waits until a message names an instance.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The instances named since the last call (the Kubernetes driver reconciles their owners).
    pub fn take_fresh(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().fresh)
    }

    /// Ends the notices whose work is done, by what the providers list now: the instance is
    /// shutting down or gone, or no listing has shown it `UNKNOWN_AFTER` after the notice
    /// (it was never fleetlb's). `state` gives an instance's state in the listing.
    pub fn settle(&self, state: impl Fn(&str) -> Option<InstanceState>) {
        let mut inner = self.lock();
        let finished: Vec<String> = inner
            .by_instance
            .iter()
            .filter(|(id, n)| match state(id) {
                Some(s) => !s.needs_terminate(),
                None => n.since.elapsed() >= UNKNOWN_AFTER,
            })
            .map(|(id, _)| id.clone())
            .collect();
        if finished.is_empty() {
            return;
        }
        let mut messages = HashSet::new();
        for id in &finished {
            if let Some(n) = inner.by_instance.remove(id) {
                messages.extend(n.messages);
            }
        }
        // A message naming several instances (a health event) waits for all of them.
        let waiting: HashSet<String> = inner
            .by_instance
            .values()
            .flat_map(|n| n.messages.iter().cloned())
            .collect();
        for message_id in messages.difference(&waiting) {
            if let Some(handle) = inner.handles.remove(message_id) {
                inner.done.push(Receipt {
                    message_id: message_id.clone(),
                    handle,
                });
            }
        }
        drop(inner);
        self.deletable.notify_one();
    }

    /// The messages done with (to delete from the queue).
    pub fn take_done(&self) -> Vec<Receipt> {
        std::mem::take(&mut self.lock().done)
    }

    /// Forgets everything (leadership lost: the next leader receives the messages again once
    /// their visibility timeout ends).
    pub fn clear(&self) {
        *self.lock() = Inner::default();
    }
}

/// Where the queue is and how to reach it.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// The queue's name (its URL is looked up with `GetQueueUrl`) or URL.
    pub queue: String,
    /// SQS endpoint URL instead of AWS's (a moto_server in the tests).
    pub endpoint: Option<String>,
}

/// Long polling: each receive waits up to this long for a message (SQS's maximum).
const WAIT: Duration = Duration::from_secs(20);

/// An SQS client from the standard AWS configuration chain, with per-call timeouts beyond the
/// long-poll wait (a queue that never answers fails the call and is tried again).
pub async fn client(endpoint: Option<&str>) -> aws_sdk_sqs::Client {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    client_from(&conf, endpoint)
}

/// [`client`] from `conf` (region, credentials, endpoint).
pub fn client_from(conf: &aws_config::SdkConfig, endpoint: Option<&str>) -> aws_sdk_sqs::Client {
    let mut b = aws_sdk_sqs::config::Builder::from(conf)
        .timeout_config(
            aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(WAIT + Duration::from_secs(10))
                .operation_timeout(WAIT + Duration::from_secs(40))
                .build(),
        )
        .retry_config(
            aws_sdk_sqs::config::retry::RetryConfig::standard()
                .with_max_attempts(3)
                .with_initial_backoff(Duration::from_millis(200))
                .with_max_backoff(Duration::from_secs(5)),
        );
    if let Some(url) = endpoint {
        b = b.endpoint_url(url);
    }
    aws_sdk_sqs::Client::from_conf(b.build())
}

/// Reads the queue while `leader` holds (always without one), recording what it says in
/// `notices` and deleting each message once [`Notices::settle`] is done with it. Failures are
/// logged and counted (`fleetlb_controller_sqs_requests_total`) and retried with backoff;
/// never returns.
pub async fn run(
    sqs: aws_sdk_sqs::Client,
    queue: String,
    notices: Arc<Notices>,
    metrics: Metrics,
    mut leader: Option<watch::Receiver<bool>>,
) {
    loop {
        if let Some(l) = leader.as_mut()
            && l.wait_for(|lead| *lead).await.is_err()
        {
            tracing::error!(
                "leadership is no longer tracked: the interruption queue is not read any more"
            );
            return;
        }
        let lost = async {
            match leader.clone() {
                Some(mut l) => {
                    let _ = l.wait_for(|lead| !*lead).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = serve(&sqs, &queue, &notices, &metrics) => {}
            () = lost => {
                tracing::info!("leadership lost: no longer reading the interruption queue");
                notices.clear();
            }
        }
    }
}

/// Resolves the queue, then receives and deletes forever.
async fn serve(sqs: &aws_sdk_sqs::Client, queue: &str, notices: &Notices, metrics: &Metrics) {
    let count = |op: &str, code: &str| {
        metrics.sqs_requests.with_label_values(&[op, code]).inc();
    };
    let code = |e: &dyn ProvideErrorMetadata| e.code().unwrap_or("dispatch").to_string();
    let mut failures = 0u32;
    let url = loop {
        if queue.starts_with("https://") || queue.starts_with("http://") {
            break queue.to_string();
        }
        match sqs.get_queue_url().queue_name(queue).send().await {
            Ok(out) => {
                count("GetQueueUrl", "ok");
                if let Some(url) = out.queue_url() {
                    break url.to_string();
                }
            }
            Err(e) => {
                count("GetQueueUrl", &code(&e));
                tracing::warn!(queue, error = %aws_smithy_types::error::display::DisplayErrorContext(&e), "cannot find the interruption queue; trying again");
            }
        }
        failures += 1;
        tokio::time::sleep(retry_delay(failures)).await;
    };
    tracing::info!(queue = %url, "reading the interruption queue");
    let receive = async {
        let mut failures = 0u32;
        loop {
            while notices.len() >= MAX_NOTICES {
                // Bounded: the messages wait in the queue.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            match sqs
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(10)
                .wait_time_seconds(WAIT.as_secs() as i32)
                .send()
                .await
            {
                Ok(out) => {
                    failures = 0;
                    count("ReceiveMessage", "ok");
                    for m in out.messages() {
                        let (Some(message_id), Some(handle)) = (m.message_id(), m.receipt_handle())
                        else {
                            continue;
                        };
                        let named = parse(m.body().unwrap_or_default());
                        let new = notices.record(
                            Receipt {
                                message_id: message_id.to_string(),
                                handle: handle.to_string(),
                            },
                            &named,
                        );
                        if !new {
                            continue;
                        }
                        if named.is_empty() {
                            metrics
                                .interruption_messages
                                .with_label_values(&["ignored"])
                                .inc();
                            tracing::debug!(
                                message_id,
                                "interruption queue: a message fleetlb does not act on; deleting it"
                            );
                        }
                        for (id, kind) in &named {
                            metrics
                                .interruption_messages
                                .with_label_values(&[kind.as_str()])
                                .inc();
                            tracing::info!(instance = %id, kind = kind.as_str(), message_id, "interruption queue: {}", kind.describe());
                        }
                    }
                }
                Err(e) => {
                    count("ReceiveMessage", &code(&e));
                    failures += 1;
                    tracing::warn!(queue = %url, error = %aws_smithy_types::error::display::DisplayErrorContext(&e), "cannot receive from the interruption queue; trying again");
                    tokio::time::sleep(retry_delay(failures)).await;
                }
            }
        }
    };
    let delete = async {
        loop {
            notices.deletable.notified().await;
            for r in notices.take_done() {
                // A failed delete leaves the message in the queue: received again, it is
                // settled again (its instance is gone by then) and deleted then.
                match sqs
                    .delete_message()
                    .queue_url(&url)
                    .receipt_handle(&r.handle)
                    .send()
                    .await
                {
                    Ok(_) => count("DeleteMessage", "ok"),
                    Err(e) => {
                        count("DeleteMessage", &code(&e));
                        tracing::warn!(message_id = r.message_id, error = %aws_smithy_types::error::display::DisplayErrorContext(&e), "cannot delete an interruption message (received again, it is settled again; or its retention period ended)");
                    }
                }
            }
        }
    };
    tokio::join!(receive, delete);
}

/// 1 s doubling to 30 s, jittered.
fn retry_delay(failures: u32) -> Duration {
    crate::core::execute::backoff((Duration::from_secs(1), Duration::from_secs(30)), failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(source: &str, detail_type: &str, detail: Value) -> String {
        serde_json::json!({
            "version": "0", "id": "7bf73129-1428-4cd3-a780-95db273d1602",
            "detail-type": detail_type, "source": source, "account": "123456789012",
            "time": "2026-12-06T12:00:00Z", "region": "us-east-1",
            "resources": ["arn:aws:ec2:us-east-1a:instance/i-1234567890abcdef0"],
            "detail": detail,
        })
        .to_string()
    }

    const ID: &str = "i-1234567890abcdef0";

    #[test]
    fn each_eventbridge_event_names_its_instances() {
        let spot = event(
            "aws.ec2",
            "EC2 Spot Instance Interruption Warning",
            serde_json::json!({"instance-id": ID, "instance-action": "terminate"}),
        );
        assert_eq!(parse(&spot), [(ID.to_string(), Kind::SpotInterruption)]);
        let rebalance = event(
            "aws.ec2",
            "EC2 Instance Rebalance Recommendation",
            serde_json::json!({"instance-id": ID}),
        );
        assert_eq!(
            parse(&rebalance),
            [(ID.to_string(), Kind::RebalanceRecommendation)]
        );
        for state in ["stopping", "stopped", "shutting-down", "terminated"] {
            let change = event(
                "aws.ec2",
                "EC2 Instance State-change Notification",
                serde_json::json!({"instance-id": ID, "state": state}),
            );
            assert_eq!(parse(&change), [(ID.to_string(), Kind::StateChange)]);
        }
        let health = event(
            "aws.health",
            "AWS Health Event",
            serde_json::json!({
                "service": "EC2", "eventTypeCategory": "scheduledChange",
                "eventTypeCode": "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED",
                "affectedEntities": [{"entityValue": ID}, {"entityValue": "i-0abcdef1234567890"}],
            }),
        );
        assert_eq!(
            parse(&health),
            [
                (ID.to_string(), Kind::ScheduledChange),
                ("i-0abcdef1234567890".to_string(), Kind::ScheduledChange)
            ]
        );
    }

    #[test]
    fn what_fleetlb_does_not_act_on_names_nothing() {
        for body in [
            event(
                "aws.ec2",
                "EC2 Instance State-change Notification",
                serde_json::json!({"instance-id": ID, "state": "running"}),
            ),
            event(
                "aws.health",
                "AWS Health Event",
                serde_json::json!({"service": "RDS", "eventTypeCategory": "scheduledChange",
                                   "affectedEntities": [{"entityValue": ID}]}),
            ),
            event(
                "aws.health",
                "AWS Health Event",
                serde_json::json!({"service": "EC2", "eventTypeCategory": "issue",
                                   "affectedEntities": [{"entityValue": ID}]}),
            ),
            event(
                "aws.ec2",
                "EC2 Spot Instance Interruption Warning",
                serde_json::json!({"instance-id": "not-an-instance"}),
            ),
            event(
                "aws.health",
                "AWS Health Event",
                serde_json::json!({"service": "EC2", "eventTypeCategory": "scheduledChange",
                                   "statusCode": "closed",
                                   "affectedEntities": [{"entityValue": ID}]}),
            ),
            event("aws.s3", "Object Created", serde_json::json!({})),
            "{\"Event\":\"s3:TestEvent\"}".to_string(),
            "not json".to_string(),
            String::new(),
        ] {
            assert!(parse(&body).is_empty(), "{body}");
        }
    }

    fn receipt(n: u32) -> Receipt {
        Receipt {
            message_id: format!("m{n}"),
            handle: format!("h{n}"),
        }
    }

    #[test]
    fn a_message_is_done_when_every_instance_it_named_is_going() {
        let notices = Notices::default();
        let (a, b) = ("i-0000000000000000a", "i-0000000000000000b");
        notices.record(receipt(1), &[(a.into(), Kind::RebalanceRecommendation)]);
        notices.record(
            receipt(2),
            &[
                (a.into(), Kind::SpotInterruption),
                (b.into(), Kind::ScheduledChange),
            ],
        );
        // The most urgent word wins.
        assert_eq!(notices.interrupted()[a], Kind::SpotInterruption);
        assert_eq!(notices.take_fresh().len(), 3);
        // Both still running: nothing is done.
        notices.settle(|_| Some(InstanceState::Running));
        assert!(notices.take_done().is_empty());
        // a is terminating: message 1 is done, message 2 still waits for b.
        notices.settle(|id| {
            Some(if id == a {
                InstanceState::ShuttingDown
            } else {
                InstanceState::Running
            })
        });
        assert_eq!(notices.take_done(), [receipt(1)]);
        assert_eq!(notices.len(), 1);
        notices.settle(|_| Some(InstanceState::Terminated));
        assert_eq!(notices.take_done(), [receipt(2)]);
        assert!(notices.is_empty());
        // A message naming nothing is done at once.
        notices.record(receipt(3), &[]);
        assert_eq!(notices.take_done(), [receipt(3)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_notice_of_an_instance_no_listing_shows_ends_after_a_while() {
        let notices = Notices::default();
        notices.record(receipt(1), &[(ID.into(), Kind::SpotInterruption)]);
        notices.settle(|_| None);
        assert!(notices.take_done().is_empty(), "too early to tell");
        tokio::time::advance(UNKNOWN_AFTER).await;
        notices.settle(|_| None);
        assert_eq!(notices.take_done(), [receipt(1)]);
    }

    #[test]
    fn a_message_received_again_is_deleted_with_its_latest_handle() {
        let notices = Notices::default();
        notices.record(receipt(1), &[(ID.into(), Kind::SpotInterruption)]);
        let again = Receipt {
            message_id: "m1".into(),
            handle: "h1-again".into(),
        };
        assert!(
            !notices.record(again.clone(), &[(ID.into(), Kind::SpotInterruption)]),
            "received again: not new"
        );
        assert_eq!(notices.take_fresh().len(), 1, "named once");
        notices.settle(|_| Some(InstanceState::Terminated));
        assert_eq!(notices.take_done(), [again]);
    }
}
