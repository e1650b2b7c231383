//! Shared by the controller's integration tests: a real `moto_server` on a free 127.0.0.1 port,
//! and an SDK configuration pointing at it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Moto {
    child: Child,
    pub url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn moto() -> Moto {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server is installed (pip install 'moto[server]'; .ci/run does it)");
    let url = format!("http://127.0.0.1:{port}");
    let m = Moto { child, url };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "moto_server did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    m
}

pub fn sdk_config(url: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(url)
        .credentials_provider(aws_sdk_ec2::config::SharedCredentialsProvider::new(
            aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "test"),
        ))
        .build()
}

pub struct Env {
    pub _moto: Moto,
    pub ec2: aws_sdk_ec2::Client,
    pub conf: aws_config::SdkConfig,
    pub image: String,
    pub subnets: Vec<String>,
}

pub async fn env() -> Env {
    let m = moto().await;
    let conf = sdk_config(&m.url);
    let ec2 = aws_sdk_ec2::Client::new(&conf);
    let images = ec2
        .describe_images()
        .send()
        .await
        .expect("moto answers DescribeImages");
    let image = images.images()[0].image_id().unwrap().to_string();
    let subnets = ec2.describe_subnets().send().await.unwrap();
    let subnets = subnets
        .subnets()
        .iter()
        .take(2)
        .map(|s| s.subnet_id().unwrap().to_string())
        .collect();
    Env {
        _moto: m,
        ec2,
        conf,
        image,
        subnets,
    }
}
