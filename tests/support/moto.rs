//! A real `moto_server` (PyPI `moto[server]`) on a free 127.0.0.1 port standing in for EC2, and
//! the few EC2 reads a test needs, made with the Query API (moto checks no signature).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Moto {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    pub fn start() -> Self {
        let port = crate::support::free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server is installed (pip install 'moto[server]'; .ci/test does it)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let m = Moto { child, addr };
        let end = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < end, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        m
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The environment fleetlb's aws provider needs to reach it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("FLEETLB_EC2_ENDPOINT", self.url()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// One EC2 Query API call; the XML answer.
    pub fn call(&self, params: &str) -> String {
        let body = format!("{params}&Version=2016-11-15");
        let raw = format!(
            "POST / HTTP/1.1\r\nHost: ec2.us-east-1.amazonaws.com\r\nContent-Type: application/x-www-form-urlencoded\r\nAuthorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let r = crate::support::request(self.addr, &raw).expect("moto answers");
        assert_eq!(r.status, 200, "{params}: {}", r.body);
        r.body
    }

    /// One SQS Query API call (parameters already percent-encoded); the XML answer.
    pub fn sqs(&self, params: &str) -> String {
        let body = format!("{params}&Version=2012-11-05");
        let raw = format!(
            "POST / HTTP/1.1\r\nHost: sqs.us-east-1.amazonaws.com\r\nContent-Type: application/x-www-form-urlencoded\r\nAuthorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let r = crate::support::request(self.addr, &raw).expect("moto answers");
        assert_eq!(r.status, 200, "{params}: {}", r.body);
        r.body
    }

    /// `s` percent-encoded for a form body.
    pub fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    /// Every value of `<tag>` in `xml`.
    pub fn values(xml: &str, tag: &str) -> Vec<String> {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        xml.split(&open)
            .skip(1)
            .filter_map(|s| s.split_once(&close).map(|(v, _)| v.to_string()))
            .collect()
    }

    /// An image id and a subnet id moto holds.
    pub fn image_and_subnet(&self) -> (String, String) {
        let images = self.call("Action=DescribeImages&Owner.1=amazon");
        let subnets = self.call("Action=DescribeSubnets");
        (
            Self::values(&images, "imageId")
                .into_iter()
                .next()
                .expect("moto has images"),
            Self::values(&subnets, "subnetId")
                .into_iter()
                .next()
                .expect("moto has subnets"),
        )
    }

    /// Instances in `state` (pending, running, ...) tagged for BackendCluster `cluster`.
    pub fn instances(&self, cluster: &str, state: &str) -> Vec<String> {
        let xml = self.call(&format!(
            "Action=DescribeInstances&Filter.1.Name=tag:fleetlb.dev/name&Filter.1.Value.1={cluster}&Filter.2.Name=instance-state-name&Filter.2.Value.1={state}"
        ));
        Self::values(&xml, "instanceId")
    }
}
