//! The other proxy replicas' load. In Kubernetes each fleetlb replica proxies part of the
//! traffic, so the autoscaler sums what every replica measures: each reading, a replica asks
//! its peers for `/debug/load` (their admin port) and adds it to its own. Peers are found by
//! name (`--peers fleetlb-peers:9090`, a headless Service: one address per ready pod), resolved
//! afresh each reading, so replicas that come and go are followed within a DNS TTL. Every
//! replica sums the same readings, so the decision does not depend on which one leads, and a
//! new leader starts with a warm window.
//!
//! Readings carry the proxy's id ([`fleetlb_dataplane::Dataplane::id`]): a replica finds itself
//! among its peers (a headless Service lists it too) and never counts a proxy twice.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use fleetlb_dataplane::ProxyLoad;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

/// A peer answering slower than this misses the reading (it is made about once a second).
const TIMEOUT: Duration = Duration::from_millis(800);
/// Largest `/debug/load` answer read (about 100 bytes a cluster).
const MAX_BODY: usize = 16 << 20;

/// Where the peers are and which of them answered last time (to log changes, not every miss).
pub(super) struct Peers {
    targets: Vec<String>,
    failing: Mutex<HashSet<SocketAddr>>,
}

impl Peers {
    /// Peers at `targets` (`host:port`, a name may stand for several addresses).
    pub(super) fn new(targets: Vec<String>) -> Self {
        Self {
            targets,
            failing: Mutex::default(),
        }
    }

    /// Every peer's load that could be read now, except `own`'s, each proxy once; and how many
    /// peers failed to answer.
    pub(super) async fn read(&self, own: &str) -> (Vec<ProxyLoad>, usize) {
        if self.targets.is_empty() {
            return (Vec::new(), 0);
        }
        let mut addrs = BTreeSet::new();
        for t in &self.targets {
            match tokio::time::timeout(TIMEOUT, tokio::net::lookup_host(t.as_str())).await {
                Ok(Ok(found)) => addrs.extend(found),
                Ok(Err(e)) => tracing::debug!(peers = %t, error = %e, "peers do not resolve"),
                Err(_) => tracing::debug!(peers = %t, "peers do not resolve in time"),
            }
        }
        let answers =
            futures::future::join_all(addrs.iter().map(|&a| async move { (a, fetch(a).await) }))
                .await;
        let mut loads = Vec::new();
        let mut seen = HashSet::new();
        let mut failed = 0;
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        for (addr, answer) in answers {
            match answer {
                Ok(load) => {
                    if failing.remove(&addr) {
                        tracing::info!(peer = %addr, "peer answers again");
                    }
                    if load.proxy != own && seen.insert(load.proxy.clone()) {
                        loads.push(load);
                    }
                }
                Err(e) => {
                    failed += 1;
                    if failing.insert(addr) {
                        tracing::warn!(peer = %addr, error = %e, "cannot read a peer's load; its last reading counts for 3 s, then the sum goes on without it");
                    }
                }
            }
        }
        // Addresses gone from DNS are no longer failing.
        failing.retain(|a| addrs.contains(a));
        (loads, failed)
    }
}

/// Aborts the connection task when the exchange ends or is abandoned.
struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `GET /debug/load` from one peer.
async fn fetch(addr: SocketAddr) -> Result<ProxyLoad, String> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let _conn = Abort(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let req = http::Request::get("/debug/load")
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("/debug/load answered {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading /debug/load: {e}"))?
            .to_bytes();
        serde_json::from_slice::<ProxyLoad>(&body).map_err(|e| format!("/debug/load: {e}"))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {TIMEOUT:?}")))
}

/// One proxy's previous reading: when, and per cluster (in flight, answered so far, the rate
/// answered since the reading before).
pub(super) struct Source {
    at: Duration,
    clusters: HashMap<String, (u64, u64, f64)>,
}

/// A proxy missing from a reading counts with its last one for this long, then not at all (a
/// replica gone, or a peer that stopped answering).
pub(super) const STALE: Duration = Duration::from_secs(3);

/// Folds `readings` taken at `now` into `sources` (by proxy id) and returns each cluster's sum
/// over every proxy heard from within [`STALE`]: (in flight, requests per second).
pub(super) fn sum(
    sources: &mut HashMap<String, Source>,
    readings: Vec<ProxyLoad>,
    now: Duration,
) -> HashMap<String, (f64, f64)> {
    for r in readings {
        let prev = sources.remove(&r.proxy);
        let clusters = r
            .clusters
            .into_iter()
            .map(|c| {
                // A counter is per proxy: its rate comes from its own previous reading.
                let rps = prev
                    .as_ref()
                    .filter(|p| now > p.at)
                    .and_then(|p| p.clusters.get(&c.cluster).map(|x| (p.at, x.1)))
                    .map_or(0.0, |(at, answered)| {
                        c.answered.saturating_sub(answered) as f64 / (now - at).as_secs_f64()
                    });
                (c.cluster, (c.inflight, c.answered, rps))
            })
            .collect();
        sources.insert(r.proxy, Source { at: now, clusters });
    }
    sources.retain(|_, s| now.saturating_sub(s.at) <= STALE);
    let mut out: HashMap<String, (f64, f64)> = HashMap::new();
    for s in sources.values() {
        for (cluster, &(inflight, _, rps)) in &s.clusters {
            let e = out.entry(cluster.clone()).or_default();
            e.0 += inflight as f64;
            e.1 += rps;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlb_dataplane::ClusterLoad;

    fn reading(proxy: &str, inflight: u64, answered: u64) -> ProxyLoad {
        ProxyLoad {
            proxy: proxy.into(),
            clusters: vec![ClusterLoad {
                cluster: "web".into(),
                inflight,
                answered,
            }],
        }
    }

    #[test]
    fn sums_in_flight_and_per_proxy_rates() {
        let mut sources = HashMap::new();
        let s = |secs| Duration::from_secs(secs);
        sum(
            &mut sources,
            vec![reading("a", 1, 100), reading("b", 2, 5000)],
            s(10),
        );
        // b restarted (a new id, its counter from zero): no negative or huge rate.
        let got = sum(
            &mut sources,
            vec![reading("a", 3, 120), reading("b2", 4, 0)],
            s(11),
        );
        // b's last reading still counts (within STALE), with its rate (0: one reading).
        assert_eq!(got["web"], (3.0 + 4.0 + 2.0, 20.0));
        let got = sum(
            &mut sources,
            vec![reading("a", 3, 140), reading("b2", 4, 10)],
            s(15),
        );
        // b gone for 5 s: dropped. a: 20 over 4 s; b2: 10 over 4 s.
        assert_eq!(got["web"], (7.0, 5.0 + 2.5));
        // Nobody heard from for longer than STALE: nothing.
        assert!(sum(&mut sources, Vec::new(), s(30)).is_empty());
    }
}
