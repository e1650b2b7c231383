//! The HTTPS listener with certificates generated here (rcgen): SNI, ALPN, protocol versions,
//! reload under load, a broken renewal, redirects, metrics. Real TLS clients (rustls) and real
//! upstreams on 127.0.0.1.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fleetlb_dataplane::ProxyConfig;
use fleetlb_dataplane::tls::{CertFiles, Certs};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A self-signed certificate for `names`, valid until 2030-01-01: (cert PEM, key PEM, DER).
fn cert(names: &[&str]) -> (String, String, Vec<u8>) {
    cert_until(names, 2030)
}

/// The same, valid until January 1st of `year`.
fn cert_until(names: &[&str], year: i32) -> (String, String, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.not_before = rcgen::date_time_ymd(2001, 1, 1);
    params.not_after = rcgen::date_time_ymd(year, 1, 1);
    let c = params.self_signed(&key).unwrap();
    (c.pem(), key.serialize_pem(), c.der().to_vec())
}

/// Writes a pair into `dir` the way a Secret volume changes: new files, then one rename.
fn install(dir: &Path, name: &str, pem: &(String, String, Vec<u8>)) -> CertFiles {
    let files = CertFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    for (path, text) in [(&files.key, &pem.1), (&files.cert, &pem.0)] {
        let tmp: PathBuf = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    files
}

/// Accepts any server certificate (the tests look at which one was served).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config(
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every connection a full handshake: a resumed session keeps the certificate it began
    // with, and these tests look at which certificate is served.
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(addr: SocketAddr, sni: &str, cfg: Arc<ClientConfig>) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

fn served(s: &Tls) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// GET `path` over an established TLS connection (HTTP/1.1 or h2 as ALPN agreed): (status,
/// body, X-Forwarded-Proto the upstream saw).
async fn get_over(s: Tls, host: &str, path: &str) -> Result<(u16, String, String), String> {
    let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
    let req = Request::get(format!("https://{host}{path}"))
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = req;
        req.headers_mut().remove(http::header::HOST);
        send.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = req;
        *req.uri_mut() = path.parse().unwrap();
        send.send_request(req).await.map_err(|e| e.to_string())?
    };
    let status = resp.status().as_u16();
    let proto = resp
        .headers()
        .get("x-seen-forwarded-proto")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned(), proto))
}

/// A proxy with one upstream behind `/c` on a plain port and an HTTPS port serving `certs`.
struct Https {
    _up: Upstream,
    proxy: Proxy,
    tls: SocketAddr,
}

async fn https(certs: &Certs, config: ProxyConfig) -> Https {
    let up = Upstream::start("a").await;
    let mut r = route(vec![up.endpoint()]);
    r.https_redirect = true;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls = listener.local_addr().unwrap();
    let proxy = Proxy::start(
        ProxyConfig {
            https_port: Some(tls.port()),
            ..config
        },
        vec![r],
    )
    .await;
    proxy.wait_healthy(1).await;
    let (dp, certs) = (proxy.dataplane.clone(), certs.clone());
    tokio::spawn(async move {
        dp.serve_tls(listener, &certs, std::future::pending())
            .await
            .unwrap()
    });
    Https {
        _up: up,
        proxy,
        tls,
    }
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_an_unknown_name_gets_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let a = cert(&["a.example.com"]);
    let b = cert(&["*.b.example.com"]);
    let wild = cert(&["*.example.com"]);
    let shop = cert(&["shop.example.com"]);
    let certs = Certs::load(vec![
        install(dir.path(), "a", &a),
        install(dir.path(), "b", &b),
        install(dir.path(), "wild", &wild),
        install(dir.path(), "shop", &shop),
    ])
    .unwrap();
    let h = https(&certs, ProxyConfig::default()).await;
    let cfg = client_config(&[b"http/1.1"], BOTH);
    for (sni, want) in [
        ("a.example.com", &a.2),
        ("shop.b.example.com", &b.2),
        ("SHOP.B.EXAMPLE.COM", &b.2),
        // An exact name wins over a wildcard listed before it.
        ("shop.example.com", &shop.2),
        ("blog.example.com", &wild.2),
        // One label only, as for host rules: not the wildcard's.
        ("x.shop.b.example.com", &a.2),
        ("other.org", &a.2),
    ] {
        let s = connect(h.tls, sni, cfg.clone()).await.unwrap();
        assert_eq!(&served(&s), want, "SNI {sni}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_h2_or_http1_and_the_upstream_sees_https() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::load(vec![install(dir.path(), "a", &cert(&["a.example.com"]))]).unwrap();
    let h = https(&certs, ProxyConfig::default()).await;
    for (alpn, want) in [
        (&[&b"h2"[..], b"http/1.1"][..], &b"h2"[..]),
        (&[&b"http/1.1"[..]][..], &b"http/1.1"[..]),
    ] {
        let s = connect(h.tls, "a.example.com", client_config(alpn, BOTH))
            .await
            .unwrap();
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(want));
        let (status, body, proto) = get_over(s, "a.example.com", "/c/x").await.unwrap();
        assert_eq!((status, body.as_str(), proto.as_str()), (200, "a", "https"));
    }
    // TLS 1.2 alone is served too.
    let s = connect(
        h.tls,
        "a.example.com",
        client_config(&[b"http/1.1"], &[&rustls::version::TLS12]),
    )
    .await
    .unwrap();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let m = |v: &str| {
        h.proxy.metric(
            "fleetlb_tls_handshakes_total",
            &[("result", "ok"), ("version", v)],
        )
    };
    // The server counts a handshake when it is done on its side, which the client can beat.
    eventually("handshakes counted by version", || {
        (m("TLSv1_3"), m("TLSv1_2")) == (2.0, 1.0)
    })
    .await;
}

/// A TLS 1.1 ClientHello (legacy version 0x0302, no supported_versions extension), offering
/// suites the server has (so the version alone is the reason it is refused).
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend([7u8; 32]); // random
    body.push(0); // session id
    // TLS_AES_128_GCM_SHA256, ECDHE-ECDSA/RSA-AES128-GCM-SHA256, ECDHE-RSA-AES128-SHA.
    body.extend([0x00, 0x08, 0x13, 0x01, 0xc0, 0x2b, 0xc0, 0x2f, 0xc0, 0x13]);
    body.extend([0x01, 0x00]); // compression: null
    // Extensions: signature_algorithms (rsa_pkcs1_sha256, ecdsa_secp256r1_sha256).
    body.extend([
        0x00, 0x0a, 0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x01, 0x04, 0x03,
    ]);
    let mut hs = vec![0x01, 0x00, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend(body);
    let mut record = vec![0x16, 0x03, 0x01, (hs.len() >> 8) as u8, hs.len() as u8];
    record.extend(hs);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_1_is_refused_with_a_protocol_version_alert() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::load(vec![install(dir.path(), "a", &cert(&["a.example.com"]))]).unwrap();
    let h = https(&certs, ProxyConfig::default()).await;
    let mut s = TcpStream::connect(h.tls).await.unwrap();
    s.write_all(&tls11_client_hello()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut answer)).await;
    // An alert record (21), fatal (2), protocol_version (70); never a ServerHello (22).
    assert_eq!(answer.first(), Some(&21), "{answer:?}");
    assert_eq!(answer.get(5..7), Some(&[2u8, 70][..]), "{answer:?}");
    // Counted by the server after it sent the alert: the client may see the close first.
    eventually("the failed handshake is counted", || {
        h.proxy
            .metric("fleetlb_tls_handshakes_total", &[("result", "failed")])
            == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_reaches_new_connections_without_failing_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let old = cert(&["a.example.com"]);
    let files = install(dir.path(), "a", &old);
    let certs = Certs::load(vec![files.clone()]).unwrap();
    let h = https(&certs, ProxyConfig::default()).await;
    certs.watch(h.proxy.dataplane.metrics().clone());

    // New connections, one request each, back to back, while the files change.
    let running = Arc::new(AtomicBool::new(true));
    let seen = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let (failed, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (running, seen, failed, done, addr) = (
            running.clone(),
            seen.clone(),
            failed.clone(),
            done.clone(),
            h.tls,
        );
        tokio::spawn(async move {
            let cfg = client_config(&[b"h2", b"http/1.1"], BOTH);
            while running.load(Relaxed) {
                let ok = match connect(addr, "a.example.com", cfg.clone()).await {
                    Ok(s) => {
                        let der = served(&s);
                        let r = get_over(s, "a.example.com", "/c").await;
                        let mut seen = seen.lock().unwrap();
                        if !seen.contains(&der) {
                            seen.push(der);
                        }
                        matches!(r, Ok((200, _, _)))
                    }
                    Err(_) => false,
                };
                if !ok {
                    failed.fetch_add(1, Relaxed);
                }
                done.fetch_add(1, Relaxed);
            }
        })
    };
    eventually("requests flow", || done.load(Relaxed) >= 20).await;
    let new = cert(&["a.example.com"]);
    install(dir.path(), "a", &new);
    eventually("new connections get the renewed certificate", || {
        seen.lock().unwrap().contains(&new.2)
    })
    .await;
    let after = done.load(Relaxed);
    eventually("more requests on the new certificate", || {
        done.load(Relaxed) >= after + 20
    })
    .await;
    running.store(false, Relaxed);
    load.await.unwrap();
    assert_eq!(failed.load(Relaxed), 0, "of {}", done.load(Relaxed));
    assert_eq!(*seen.lock().unwrap(), vec![old.2, new.2]);
    assert!(certs.status()[0].error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_renewal_keeps_the_old_certificate_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let old = cert(&["a.example.com"]);
    let files = install(dir.path(), "a", &old);
    let certs = Certs::load(vec![files.clone()]).unwrap();
    let h = https(&certs, ProxyConfig::default()).await;
    let cfg = client_config(&[b"http/1.1"], BOTH);

    // Not PEM at all; then a certificate with another certificate's key.
    let other = cert(&["a.example.com"]);
    let expired = cert_until(&["a.example.com"], 2020);
    for (bad, says) in [
        (
            ("garbage".to_string(), old.1.clone(), Vec::new()),
            "no certificate",
        ),
        (
            (other.0.clone(), old.1.clone(), Vec::new()),
            "does not match",
        ),
        (expired.clone(), "expired"),
    ] {
        install(dir.path(), "a", &bad);
        // Once may be a pair caught mid-replacement: not said yet; twice is refused and said.
        assert!(!certs.reload(), "a broken pair is not loaded");
        let first = certs.status()[0].error.clone().unwrap_or_default();
        assert!(!first.contains(says), "said after one reading: {first}");
        assert!(!certs.reload(), "a broken pair is not loaded");
        let error = certs.status()[0].error.clone().unwrap_or_default();
        assert!(error.contains(says), "{error}");
        let s = connect(h.tls, "a.example.com", cfg.clone()).await.unwrap();
        assert_eq!(served(&s), old.2);
        assert_eq!(get_over(s, "a.example.com", "/c").await.unwrap().0, 200);
    }
    // A bad startup certificate is refused outright, naming the file.
    let e = Certs::load(vec![files.clone()]).unwrap_err().to_string();
    assert!(e.contains("a.crt") && e.contains("expired"), "{e}");
    // Fixed: served again, the error gone.
    install(dir.path(), "a", &other);
    assert!(certs.reload());
    assert!(certs.status()[0].error.is_none());
    let s = connect(h.tls, "a.example.com", cfg).await.unwrap();
    assert_eq!(served(&s), other.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_redirected_to_https_where_the_route_asks() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::load(vec![install(dir.path(), "a", &cert(&["a.example.com"]))]).unwrap();
    let h = https(&certs, ProxyConfig::default()).await;
    let answer = exchange(
        h.proxy.addr,
        b"GET /c/x?y=1 HTTP/1.1\r\nHost: Shop.Example.com:8000\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
    let location = format!(
        "location: https://shop.example.com:{}/c/x?y=1\r\n",
        h.tls.port()
    );
    assert!(answer.to_ascii_lowercase().contains(&location), "{answer}");
    // A Host that is not a host name never becomes a Location.
    for host in ["good.com@evil.com", "evil.com/x", "a.com\\@b"] {
        let answer = exchange(
            h.proxy.addr,
            format!("GET /c HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{host}: {answer}");
    }
    // Over HTTPS the same route serves.
    let s = connect(h.tls, "a.example.com", client_config(&[b"http/1.1"], BOTH))
        .await
        .unwrap();
    assert_eq!(get_over(s, "a.example.com", "/c/x").await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_expiry_is_exported() {
    let dir = tempfile::tempdir().unwrap();
    let files = install(dir.path(), "a", &cert(&["a.example.com"]));
    let certs = Certs::load(vec![files.clone()]).unwrap();
    let h = https(&certs, ProxyConfig::default()).await;
    certs.export(h.proxy.dataplane.metrics());
    let label = files.cert.display().to_string();
    assert_eq!(
        h.proxy.metric(
            "fleetlb_tls_certificate_expiry_timestamp_seconds",
            &[("cert", label.as_str())]
        ),
        1_893_456_000.0 // 2030-01-01T00:00:00Z
    );
    assert_eq!(certs.status()[0].not_after, "2030-01-01T00:00:00Z");
    assert_eq!(certs.status()[0].names, ["a.example.com"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_silent_after_its_handshake_is_closed_at_the_head_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let a = cert(&["a.example.com"]);
    let certs = Certs::load(vec![install(dir.path(), "a", &a)]).unwrap();
    let h = https(
        &certs,
        ProxyConfig {
            limits: fleetlb_dataplane::Limits {
                head_timeout: Duration::from_secs(1),
                ..Default::default()
            },
            ..ProxyConfig::default()
        },
    )
    .await;
    let mut s = connect(h.tls, "a.example.com", client_config(&[b"http/1.1"], BOTH))
        .await
        .expect("the handshake completes");
    // Nothing is sent after the handshake: the slot is given back at the head timeout.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("the proxy closes a connection that sends no request");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    eventually("its slot to be free", || {
        h.proxy.metric("fleetlb_connections_active", &[]) == 0.0
    })
    .await;
    assert_eq!(
        h.proxy.metric(
            "fleetlb_limit_hits_total",
            &[("limit", "client-head-timeout")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_the_tls_version_and_the_server_name() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::load(vec![install(dir.path(), "a", &cert(&["a.example.com"]))]).unwrap();
    let (lines, cfg) = logged(1.0);
    let h = https(&certs, cfg).await;
    for (alpn, version, protocol) in [
        (&b"h2"[..], &rustls::version::TLS13, "HTTP/2"),
        (&b"http/1.1"[..], &rustls::version::TLS12, "HTTP/1.1"),
    ] {
        let s = connect(h.tls, "a.example.com", client_config(&[alpn], &[version]))
            .await
            .unwrap();
        let (status, _, _) = get_over(s, "a.example.com", "/c/secure").await.unwrap();
        assert_eq!(status, 200);
        let got = lines.wait(1).await;
        let line = got.last().unwrap();
        let want = if protocol == "HTTP/2" {
            "TLSv1.3"
        } else {
            "TLSv1.2"
        };
        assert_eq!(line["tls_version"], want, "{line}");
        assert_eq!(line["sni"], "a.example.com", "{line}");
        assert_eq!(line["protocol"], protocol, "{line}");
        assert_eq!(line["path"], "/c/secure", "{line}");
        assert_eq!(line["status"], 200, "{line}");
        lines.0.lock().unwrap().clear();
    }
}
