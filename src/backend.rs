//! The demo backend: what a `local` instance runs (`fleetlb backend`).
//!
//! It answers like the original experiment's FastAPI app: `GET /health` gives 200 at once, and
//! any other path gives JSON naming the instance and cluster after the instance type's service
//! time, with at most the type's concurrency being served at once (more requests queue, as on a
//! busy CPU). The profiles make small types slower than large ones:
//!
//! | size            | service time | concurrency |
//! |-----------------|--------------|-------------|
//! | nano            | 10 ms        | 2           |
//! | micro           | 6 ms         | 4           |
//! | small           | 5 ms         | 4           |
//! | medium          | 4 ms         | 8           |
//! | large           | 3 ms         | 8           |
//! | xlarge          | 2 ms         | 16          |
//! | 2xlarge and up  | 1 ms         | 32          |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Service time and concurrency of an instance type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Profile {
    /// Time each request takes once it is being served.
    pub latency: Duration,
    /// Requests served at once.
    pub concurrency: usize,
}

impl Profile {
    /// The profile of an EC2 instance type, by its size (`t2.micro` -> micro).
    pub fn for_instance_type(instance_type: &str) -> Self {
        let size = instance_type.rsplit('.').next().unwrap_or("");
        let (ms, concurrency) = match size {
            "nano" => (10, 2),
            "micro" => (6, 4),
            "small" => (5, 4),
            "medium" => (4, 8),
            "large" => (3, 8),
            "xlarge" => (2, 16),
            _ => (1, 32),
        };
        Self {
            latency: Duration::from_millis(ms),
            concurrency,
        }
    }
}

/// How to run one backend.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// Instance id it reports.
    pub id: String,
    /// Cluster name it reports.
    pub cluster: String,
    /// Instance type it reports.
    pub instance_type: String,
    /// Service time and concurrency.
    pub profile: Profile,
}

/// Serves until `shutdown` completes, then finishes the requests in flight.
pub async fn serve(
    listener: TcpListener,
    cfg: BackendConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let cfg = Arc::new(cfg);
    let cpu = Arc::new(Semaphore::new(cfg.profile.concurrency.max(1)));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer): (_, SocketAddr) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (cfg, cpu) = (cfg.clone(), cpu.clone());
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let (cfg, cpu) = (cfg.clone(), cpu.clone());
            async move { Ok::<_, Infallible>(answer(&cfg, &cpu, req.uri().path()).await) }
        });
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned(),
        );
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
}

async fn answer(cfg: &BackendConfig, cpu: &Semaphore, path: &str) -> Response<Full<Bytes>> {
    if path == "/health" {
        return json(StatusCode::OK, r#"{"status":"ok"}"#.to_string());
    }
    // `.../bytes/N`: N bytes (at most 1 MiB), for benchmarks of large answers and slow readers.
    if let Some(n) = path
        .rsplit_once("/bytes/")
        .and_then(|(_, n)| n.parse::<usize>().ok())
    {
        static BLOCK: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
        let block = BLOCK.get_or_init(|| Bytes::from(vec![b'x'; 1 << 20]));
        return Response::new(Full::new(block.slice(..n.min(block.len()))));
    }
    let Ok(_permit) = cpu.acquire().await else {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":"shutting down"}"#.into(),
        );
    };
    if !cfg.profile.latency.is_zero() {
        tokio::time::sleep(cfg.profile.latency).await;
    }
    let body = serde_json::json!({
        "message": format!("Instance {} of {} has received the request", cfg.id, cfg.cluster),
        "instance_id": cfg.id,
        "cluster": cfg.cluster,
        "instance_type": cfg.instance_type,
    });
    json(StatusCode::OK, body.to_string())
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::Profile;

    #[test]
    fn small_types_are_slower_and_narrower_than_large_ones() {
        let micro = Profile::for_instance_type("t2.micro");
        let large = Profile::for_instance_type("t2.large");
        assert!(micro.latency > large.latency);
        assert!(micro.concurrency < large.concurrency);
    }
}
