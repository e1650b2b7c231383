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
//!
//! With `--grpc` (what the `local` provider launches for `spec.protocol: GRPC`) it also serves
//! gRPC over HTTP/2 (h2c): `fleetlb.demo.Echo` (examples/grpc/echo.proto; `Say` with the same
//! service time and JSON fields as the HTTP answer, `Count` streaming) and
//! `grpc.health.v1.Health/Check`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Requests and calls answered, besides `/health` and `/served` (one backend per process).
static SERVED: AtomicU64 = AtomicU64::new(0);

/// What the backend answers with.
type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

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
    /// Serve the demo gRPC services too.
    pub grpc: bool,
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
            async move {
                if cfg.grpc && fleetlb_dataplane::grpc::is_grpc_request(&req) {
                    return Ok::<_, Infallible>(grpc::call(&cfg, &cpu, req).await);
                }
                Ok::<_, Infallible>(
                    answer(&cfg, &cpu, req.uri().path())
                        .await
                        .map(BodyExt::boxed),
                )
            }
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
    // How many requests and calls it answered (benchmarks read the spread from it).
    if path == "/served" {
        return json(
            StatusCode::OK,
            format!(r#"{{"served":{}}}"#, SERVED.load(Relaxed)),
        );
    }
    SERVED.fetch_add(1, Relaxed);
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

/// The demo gRPC services.
mod grpc {
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use fleetlb_dataplane::grpc::{
        self as g, HealthCheckRequest, HealthCheckResponse, SERVING, code, frame, unframe,
    };
    use http::{HeaderMap, HeaderValue, Response, header};
    use http_body::Frame;
    use http_body_util::{BodyExt, Limited, StreamBody};
    use prost::Message;
    use tokio::sync::Semaphore;

    use super::{BackendConfig, Body};

    /// gRPC's default largest message.
    const MAX_REQUEST: usize = 4 << 20;

    /// `fleetlb.demo.SayRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SayRequest {
        #[prost(string, tag = "1")]
        pub message: String,
    }

    /// `fleetlb.demo.SayReply`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SayReply {
        #[prost(string, tag = "1")]
        pub message: String,
        #[prost(string, tag = "2")]
        pub instance_id: String,
        #[prost(string, tag = "3")]
        pub cluster: String,
        #[prost(string, tag = "4")]
        pub instance_type: String,
    }

    /// `fleetlb.demo.CountRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CountRequest {
        #[prost(uint32, tag = "1")]
        pub n: u32,
        #[prost(uint32, tag = "2")]
        pub interval_ms: u32,
    }

    pub(super) async fn call(
        cfg: &BackendConfig,
        cpu: &Semaphore,
        req: http::Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        let path = req.uri().path().to_string();
        let Ok(body) = Limited::new(req.into_body(), MAX_REQUEST).collect().await else {
            return status(code::RESOURCE_EXHAUSTED, "request too large or broken");
        };
        let body = body.to_bytes();
        if path != g::HEALTH_CHECK {
            super::SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let Some(message) = unframe(&body).and_then(|m| m.first().copied()) else {
            return status(code::INTERNAL, "expected one uncompressed message");
        };
        match path.as_str() {
            g::HEALTH_CHECK => {
                let Ok(req) = HealthCheckRequest::decode(message) else {
                    return status(code::INVALID_ARGUMENT, "bad HealthCheckRequest");
                };
                if !req.service.is_empty() && req.service != "fleetlb.demo.Echo" {
                    return status(code::NOT_FOUND, "unknown service");
                }
                let reply = HealthCheckResponse { status: SERVING };
                unary(cfg, reply.encode_to_vec())
            }
            "/fleetlb.demo.Echo/Say" => {
                let Ok(req) = SayRequest::decode(message) else {
                    return status(code::INVALID_ARGUMENT, "bad SayRequest");
                };
                let Ok(_permit) = cpu.acquire().await else {
                    return status(code::UNAVAILABLE, "shutting down");
                };
                if !cfg.profile.latency.is_zero() {
                    tokio::time::sleep(cfg.profile.latency).await;
                }
                unary(cfg, reply(cfg, req.message).encode_to_vec())
            }
            "/fleetlb.demo.Echo/Count" => {
                let Ok(req) = CountRequest::decode(message) else {
                    return status(code::INVALID_ARGUMENT, "bad CountRequest");
                };
                let n = req.n.min(1000);
                let every = Duration::from_millis(u64::from(req.interval_ms.min(10_000)));
                let cfg = cfg.clone();
                let frames = futures::stream::unfold(0u32, move |i| {
                    let cfg = cfg.clone();
                    async move {
                        if i > n {
                            return None;
                        }
                        if i == n {
                            return Some((Ok(Frame::trailers(ok_trailers(&cfg))), i + 1));
                        }
                        if i > 0 {
                            tokio::time::sleep(every).await;
                        }
                        let m = reply(&cfg, format!("{}", i + 1)).encode_to_vec();
                        Some((Ok::<_, Infallible>(Frame::data(frame(&m))), i + 1))
                    }
                });
                respond(StreamBody::new(frames).boxed())
            }
            _ => status(code::UNIMPLEMENTED, "unknown method"),
        }
    }

    fn reply(cfg: &BackendConfig, message: String) -> SayReply {
        SayReply {
            message: format!(
                "Instance {} of {} has received: {message}",
                cfg.id, cfg.cluster
            ),
            instance_id: cfg.id.clone(),
            cluster: cfg.cluster.clone(),
            instance_type: cfg.instance_type.clone(),
        }
    }

    /// `grpc-status: 0`, and the instance's id as trailing metadata (`x-instance`).
    fn ok_trailers(cfg: &BackendConfig) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert(g::GRPC_STATUS.clone(), HeaderValue::from_static("0"));
        if let Ok(id) = HeaderValue::from_str(&cfg.id) {
            t.insert("x-instance", id);
        }
        t
    }

    /// One message, then the OK trailers.
    fn unary(cfg: &BackendConfig, message: Vec<u8>) -> Response<Body> {
        let frames = [
            Ok::<_, Infallible>(Frame::data(frame(&message))),
            Ok(Frame::trailers(ok_trailers(cfg))),
        ];
        respond(StreamBody::new(futures::stream::iter(frames)).boxed())
    }

    fn respond(body: Body) -> Response<Body> {
        let mut resp = Response::new(body);
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        resp
    }

    /// A trailers-only answer with `code`.
    fn status(code: u32, message: &'static str) -> Response<Body> {
        let mut resp = respond(
            http_body_util::Empty::<Bytes>::new()
                .map_err(|e| match e {})
                .boxed(),
        );
        let h = resp.headers_mut();
        h.insert(g::GRPC_STATUS.clone(), HeaderValue::from(code));
        h.insert(g::GRPC_MESSAGE.clone(), HeaderValue::from_static(message));
        resp
    }
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
