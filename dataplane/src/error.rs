//! The one place where data-plane failures become HTTP responses.
//!
//! Bodies are short plain text and never carry internal details (addresses, OS errors); the log
//! line and the `fleetlb_proxy_errors_total{reason}` counter do.

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ResponseBody;

/// nginx's status for a request whose client closed the connection first.
fn client_closed() -> StatusCode {
    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
}

/// Why fleetlb answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// No rule matches the host and path.
    #[error("no route for this host and path")]
    NoRoute,
    #[error("bad request path")]
    BadPath,
    /// The route's cluster has no endpoint that can take the request.
    #[error("no healthy endpoint")]
    NoHealthyEndpoint,
    /// The endpoint refused or dropped the connection.
    #[error("upstream connection failed")]
    UpstreamConnect,
    /// The connection broke after the request was sent.
    #[error("upstream connection reset")]
    UpstreamReset,
    /// No response headers within the request timeout.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The client's request body broke the framing rules (e.g. a bad chunk size).
    #[error("malformed request body")]
    BadRequestBody,
    /// The client went away before its answer (nginx logs this as 499). Never sent: there is
    /// no one to send it to; it names the cause in logs and metrics.
    #[error("client closed the request")]
    ClientClosed,
    /// The client stopped sending its body for longer than the request timeout.
    #[error("client request body timed out")]
    ClientTimeout,
    /// A transfer coding other than chunked, which fleetlb cannot pass on faithfully.
    #[error("unsupported transfer coding")]
    UnsupportedTransferCoding,
    /// More than one Host, or an authority that cannot be a Host.
    #[error("bad host")]
    BadHost,
    /// Every cluster sharing the rule has weight 0.
    #[error("every cluster of this route has weight 0")]
    ZeroWeight,
    /// `chunked` named more than once: framing servers would read differently.
    #[error("bad request framing")]
    BadFraming,
    /// The client connection has `--max-upstream-per-connection` requests in flight already.
    #[error("too many requests in flight on this connection")]
    ConnectionBusy,
    /// The endpoint's connection slots and queue are full, or the wait in its queue ran out.
    #[error("endpoint busy")]
    EndpointFull,
    /// The proxy ran out of descriptors, ports or buffers for an upstream connection.
    #[error("proxy out of resources")]
    LocalResources,
    /// A gRPC call over HTTP/1.1, which cannot carry its trailers.
    #[error("gRPC requires HTTP/2")]
    GrpcNeedsHttp2,
    /// A gRPC call routed to a cluster whose instances speak HTTP/1.1 (`spec.protocol`).
    #[error("this route's instances speak HTTP/1.1, not gRPC (spec.protocol)")]
    NotGrpcCluster,
    /// A request that is not a gRPC call routed to a `GRPC` cluster.
    #[error("this route serves gRPC only")]
    NotGrpcCall,
    /// Every instance tried answered `UNAVAILABLE` before any response byte.
    #[error("upstream unavailable")]
    UpstreamUnavailable,
    /// The gRPC caller's own deadline (`grpc-timeout`) passed before the answer.
    #[error("deadline exceeded")]
    DeadlineExceeded,
}

impl ProxyError {
    /// HTTP status sent to the client.
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadPath => StatusCode::BAD_REQUEST,
            ProxyError::NoHealthyEndpoint => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamConnect | ProxyError::UpstreamReset => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequestBody => StatusCode::BAD_REQUEST,
            ProxyError::ClientClosed => client_closed(),
            ProxyError::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            ProxyError::BadHost => StatusCode::BAD_REQUEST,
            ProxyError::ZeroWeight => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadFraming => StatusCode::BAD_REQUEST,
            ProxyError::ConnectionBusy | ProxyError::EndpointFull | ProxyError::LocalResources => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::GrpcNeedsHttp2 => StatusCode::BAD_REQUEST,
            ProxyError::NotGrpcCluster => StatusCode::NOT_IMPLEMENTED,
            ProxyError::NotGrpcCall => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProxyError::UpstreamUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Label for `fleetlb_proxy_errors_total{reason}`.
    pub fn reason(self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::BadPath => "bad_path",
            ProxyError::NoHealthyEndpoint => "no_healthy_endpoint",
            ProxyError::UpstreamConnect => "connect",
            ProxyError::UpstreamReset => "reset",
            ProxyError::UpstreamTimeout => "timeout",
            ProxyError::BadRequestBody => "bad_request_body",
            ProxyError::ClientClosed => "client_closed",
            ProxyError::ClientTimeout => "client_timeout",
            ProxyError::UnsupportedTransferCoding => "unsupported_transfer_coding",
            ProxyError::BadHost => "bad_host",
            ProxyError::ZeroWeight => "zero_weight",
            ProxyError::BadFraming => "bad_framing",
            ProxyError::ConnectionBusy => "connection_busy",
            ProxyError::EndpointFull => "endpoint_full",
            ProxyError::LocalResources => "local_resources",
            ProxyError::GrpcNeedsHttp2 => "grpc_needs_http2",
            ProxyError::NotGrpcCluster => "not_grpc_cluster",
            ProxyError::NotGrpcCall => "not_grpc_call",
            ProxyError::UpstreamUnavailable => "unavailable",
            ProxyError::DeadlineExceeded => "deadline_exceeded",
        }
    }

    fn body(self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no route for this host and path\n",
            ProxyError::BadPath => {
                "bad request path (dot segments above the root or encoded slashes)\n"
            }
            ProxyError::NoHealthyEndpoint => "no healthy endpoint\n",
            ProxyError::UpstreamConnect => "upstream connection failed\n",
            ProxyError::UpstreamReset => "upstream connection reset\n",
            ProxyError::UpstreamTimeout => "upstream timed out\n",
            ProxyError::BadRequestBody => "malformed request body\n",
            ProxyError::ClientClosed => "client closed the request\n",
            ProxyError::ClientTimeout => "request body timed out\n",
            ProxyError::UnsupportedTransferCoding => "unsupported transfer coding\n",
            ProxyError::BadHost => "bad host\n",
            ProxyError::ZeroWeight => "every cluster of this route has weight 0\n",
            ProxyError::BadFraming => "bad request framing (chunked named twice)\n",
            ProxyError::ConnectionBusy => "too many requests in flight on this connection\n",
            ProxyError::EndpointFull => "endpoint busy: its connections and queue are full\n",
            ProxyError::LocalResources => "proxy out of resources\n",
            ProxyError::GrpcNeedsHttp2 => {
                "gRPC requires HTTP/2: use h2c (prior knowledge) or TLS with ALPN h2\n"
            }
            ProxyError::NotGrpcCluster => "this route's instances speak HTTP/1.1, not gRPC\n",
            ProxyError::NotGrpcCall => {
                "this route serves gRPC only: POST with content-type application/grpc over HTTP/2\n"
            }
            ProxyError::UpstreamUnavailable => "upstream unavailable\n",
            ProxyError::DeadlineExceeded => "deadline exceeded\n",
        }
    }

    /// The response for this error. After a client's body failed, the connection's framing
    /// is lost: the answer closes it.
    pub fn response(self) -> Response<ResponseBody> {
        let mut resp = plain(self.status(), self.body());
        resp.extensions_mut().insert(SelfAnswered(self.reason()));
        resp.extensions_mut().insert(self);
        if self == ProxyError::ClientClosed {
            resp.extensions_mut().insert(ClientGone);
        }
        if matches!(
            self,
            ProxyError::BadRequestBody
                | ProxyError::ClientClosed
                | ProxyError::ClientTimeout
                | ProxyError::UnsupportedTransferCoding
                | ProxyError::BadHost
                | ProxyError::BadFraming
        ) {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Marks the answer to a request whose client went away (or reset its HTTP/2 stream) before
/// it: nobody reads it, and the connection counts it as a reset, not a completed request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientGone;

/// Marks an answer fleetlb made itself, with its reason (for the access log).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SelfAnswered(pub &'static str);

/// A short `text/plain` response.
pub fn plain(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::message(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
