//! The IAM policy the `aws` provider needs, generated for one install (`fleetlb iam-policy`).
//!
//! It allows exactly what [`crate::aws`] calls, scoped to the install's controller id:
//!
//! - `DescribeInstances` on `*` (EC2's Describe calls support no resource-level permissions).
//! - `RunInstances` creates an instance, its volumes, its network interfaces and (for
//!   `capacityType: spot`) its spot request only with `fleetlb.dev/controller = ID` in the
//!   request's tags. IAM evaluates `aws:RequestTag` per resource type the call creates, which
//!   is why the provider tags all of them at creation.
//! - `RunInstances` may use any image (and the snapshots behind an EBS-backed one), subnet,
//!   security group and key pair (the spec names them); nothing else (no launch templates:
//!   fleetlb uses none). Spot launches also need the account's `AWSServiceRoleForEC2Spot`
//!   service-linked role, which EC2 creates on the first spot request of an account.
//! - `CreateTags` only as part of `RunInstances` (`ec2:CreateAction`), with the same tag.
//! - `TerminateInstances` only on instances already tagged with this install's id, so one
//!   install's credentials can never terminate another's instances.
//! - `DeleteTags` (`deletionPolicy: Orphan`) only of the key `fleetlb.dev/controller`, only on
//!   instances carrying this install's id.
//! - `iam:PassRole` of the instance role only, only to EC2 (for `spec.provider.aws.iamInstanceProfile`).
//! - With an interruption queue: `sqs:GetQueueUrl`, `sqs:ReceiveMessage` and
//!   `sqs:DeleteMessage` on that queue only (Karpenter's interruption permissions).

use serde_json::{Value, json};

use crate::provider::aws::tags;

/// Settings of the generated policy.
#[derive(Clone, Debug)]
pub struct PolicyOptions {
    /// The install's controller id (`--controller-id`, or `fleetlb-<kube-system UID>`).
    pub controller_id: String,
    /// ARN partition (`aws`, `aws-cn`, `aws-us-gov`).
    pub partition: String,
    /// Name of the IAM role instances may be launched with (behind `iamInstanceProfile`).
    pub instance_role: String,
    /// The interruption queue's name or URL (`--interruption-queue`), if the controller reads
    /// one.
    pub interruption_queue: Option<String>,
}

/// The SQS calls the interruption queue's poller makes ([`crate::interruption`]).
pub const SQS_OPERATIONS: &[&str] = &["GetQueueUrl", "ReceiveMessage", "DeleteMessage"];

/// The ARN of `queue`: a name is that queue in any region and account; a URL
/// (`https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`) pins the account and, from an AWS host,
/// the region.
pub fn queue_arn(partition: &str, queue: &str) -> String {
    let (region, account, name) = match queue.split_once("://") {
        Some((_, rest)) => {
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            let mut parts = path.trim_end_matches('/').rsplit('/');
            let name = parts.next().unwrap_or_default();
            let account = parts
                .next()
                .filter(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()));
            // sqs.us-east-1.amazonaws.com, sqs.cn-north-1.amazonaws.com.cn, and the older
            // us-east-1.queue.amazonaws.com.
            let labels: Vec<&str> = host.split('.').collect();
            let region = match labels.as_slice() {
                ["sqs", r, "amazonaws", ..] | [r, "queue", "amazonaws", ..] => Some(*r),
                _ => None,
            }
            .filter(|r| {
                !r.is_empty()
                    && r.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            });
            (region.unwrap_or("*"), account.unwrap_or("*"), name)
        }
        None => ("*", "*", queue),
    };
    format!("arn:{partition}:sqs:{region}:{account}:{name}")
}

/// The policy document for `opts`.
pub fn policy(opts: &PolicyOptions) -> Value {
    let p = &opts.partition;
    let id = &opts.controller_id;
    let arn = |kind: &str| format!("arn:{p}:ec2:*:*:{kind}/*");
    // A spot launch also creates a spot-instances-request, tagged in the same request.
    let owned = [
        arn("instance"),
        arn("volume"),
        arn("network-interface"),
        arn("spot-instances-request"),
    ];
    let request_tag = format!("aws:RequestTag/{}", tags::CONTROLLER);
    let resource_tag = format!("aws:ResourceTag/{}", tags::CONTROLLER);
    let mut doc = json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "DescribeUnscoped",
                "Effect": "Allow",
                "Action": ["ec2:DescribeInstances"],
                "Resource": "*"
            },
            {
                "Sid": "RunInstancesOnlyWithThisInstallsTag",
                "Effect": "Allow",
                "Action": "ec2:RunInstances",
                "Resource": owned,
                "Condition": { "StringEquals": { request_tag.clone(): id } }
            },
            {
                "Sid": "RunInstancesSharedResources",
                "Effect": "Allow",
                "Action": "ec2:RunInstances",
                "Resource": [
                    format!("arn:{p}:ec2:*::image/*"),
                    format!("arn:{p}:ec2:*::snapshot/*"),
                    arn("subnet"),
                    arn("security-group"),
                    arn("key-pair"),
                ]
            },
            {
                "Sid": "CreateTagsOnlyAtLaunch",
                "Effect": "Allow",
                "Action": "ec2:CreateTags",
                "Resource": owned,
                "Condition": {
                    "StringEquals": {
                        "ec2:CreateAction": "RunInstances",
                        request_tag: id
                    }
                }
            },
            {
                "Sid": "TerminateOnlyThisInstallsInstances",
                "Effect": "Allow",
                "Action": "ec2:TerminateInstances",
                "Resource": arn("instance"),
                "Condition": { "StringEquals": { resource_tag.clone(): id } }
            },
            {
                "Sid": "ReleaseOnlyThisInstallsInstances",
                "Effect": "Allow",
                "Action": "ec2:DeleteTags",
                "Resource": arn("instance"),
                "Condition": {
                    "StringEquals": { resource_tag: id },
                    "ForAllValues:StringEquals": { "aws:TagKeys": [tags::CONTROLLER] }
                }
            },
            {
                "Sid": "PassOnlyTheInstanceRole",
                "Effect": "Allow",
                "Action": "iam:PassRole",
                "Resource": format!("arn:{p}:iam::*:role/{}", opts.instance_role),
                "Condition": { "StringEquals": { "iam:PassedToService": "ec2.amazonaws.com" } }
            }
        ]
    });
    if let (Some(queue), Some(statements)) =
        (&opts.interruption_queue, doc["Statement"].as_array_mut())
    {
        statements.push(json!({
            "Sid": "ReadTheInterruptionQueue",
            "Effect": "Allow",
            "Action": SQS_OPERATIONS.iter().map(|op| format!("sqs:{op}")).collect::<Vec<_>>(),
            "Resource": queue_arn(p, queue)
        }));
    }
    doc
}

/// The policy as `fleetlb iam-policy` prints it (pretty JSON, one trailing newline).
pub fn policy_json(opts: &PolicyOptions) -> String {
    let mut s = serde_json::to_string_pretty(&policy(opts)).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_url_pins_the_region_and_account() {
        assert_eq!(
            queue_arn("aws", "fleetlb-interruptions"),
            "arn:aws:sqs:*:*:fleetlb-interruptions"
        );
        assert_eq!(
            queue_arn(
                "aws",
                "https://sqs.eu-west-1.amazonaws.com/123456789012/fleetlb-interruptions"
            ),
            "arn:aws:sqs:eu-west-1:123456789012:fleetlb-interruptions"
        );
        assert_eq!(
            queue_arn(
                "aws-cn",
                "https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q"
            ),
            "arn:aws-cn:sqs:cn-north-1:123456789012:q"
        );
        assert_eq!(
            queue_arn(
                "aws",
                "https://us-east-2.queue.amazonaws.com/123456789012/q"
            ),
            "arn:aws:sqs:us-east-2:123456789012:q"
        );
        // Another endpoint (a VPC endpoint name, a local stand-in): the account only.
        assert_eq!(
            queue_arn("aws", "http://127.0.0.1:4566/123456789012/q"),
            "arn:aws:sqs:*:123456789012:q"
        );
    }
}
