//! The other proxy replicas' load. In Kubernetes each fleetlb replica proxies part of the
//! traffic, so the autoscaler sums what every replica measures: each reading, a replica asks
//! its peers for `/debug/load` (their admin port) and adds it to its own. Peers are found by
//! name (`--peers fleetlb-peers:9090`, a headless Service: one address per replica, draining
//! ones included), resolved afresh each reading, so replicas that come and go are followed
//! within a DNS TTL. Every replica reads the same proxies, so the decision does not depend on
//! which one leads, and a new leader starts with a warm window.
//!
//! Readings carry the proxy's id ([`fleetlb_dataplane::Dataplane::id`]): a replica finds itself
//! among its peers (a headless Service lists it too) and never counts a proxy twice.
//!
//! A reading is **incomplete** when the name does not resolve or a listed peer that answered
//! within the last 2 minutes does not: the sum then lacks that peer's share, so the autoscaler
//! may scale up from it but not down (HPA, more coarsely, counts pods with missing metrics as
//! at target when scaling down). A listed address that has not answered for 2 minutes, or
//! never did, carries no traffic and is left out.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use fleetlb_dataplane::ProxyLoad;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

/// A peer answering slower than this misses the reading (it is made about once a second).
const TIMEOUT: Duration = Duration::from_millis(800);
/// Largest `/debug/load` answer read (about 100 bytes a cluster).
const MAX_BODY: usize = 16 << 20;

type Lookup = tokio::task::JoinHandle<Option<BTreeSet<SocketAddr>>>;

/// Where the peers are and which of them failed last time (to log changes, not every miss).
pub(super) struct Peers {
    targets: Vec<String>,
    /// A lookup still running (the resolver outlived a reading's timeout): awaited again by
    /// the next reading instead of starting another, so lookups never pile up.
    lookup: tokio::sync::Mutex<Option<Lookup>>,
    failing: Mutex<HashSet<SocketAddr>>,
    /// When each address last answered: only a peer heard from within [`FORGET`] counts as
    /// missing when it fails. A listed address that never answered (a pod still starting, one
    /// crash-looping or stuck terminating on a lost node) carries no traffic, and must not
    /// hold every cluster's count up forever.
    answered: Mutex<HashMap<SocketAddr, Instant>>,
}

/// A peer silent for this long is no longer counted as missing (its share, if it ever had
/// one, is gone with it).
const FORGET: Duration = Duration::from_secs(120);

/// What one reading of the peers gave.
pub(super) struct Reading {
    /// Each peer's load (not this proxy's, each proxy once), with when it arrived.
    pub loads: Vec<(Instant, ProxyLoad)>,
    /// Listed peers that did not answer though they did within the last 2 min, plus one if
    /// the name did not resolve.
    pub missing: usize,
}

impl Peers {
    /// Peers at `targets` (`host:port`, a name may stand for several addresses).
    pub(super) fn new(targets: Vec<String>) -> Self {
        Self {
            targets,
            lookup: tokio::sync::Mutex::default(),
            failing: Mutex::default(),
            answered: Mutex::default(),
        }
    }

    /// Every peer's address, or `None` when a name does not resolve in time.
    async fn resolve(&self) -> Option<BTreeSet<SocketAddr>> {
        let mut pending = self.lookup.lock().await;
        let targets = self.targets.clone();
        let lookup = pending.get_or_insert_with(|| {
            tokio::spawn(async move {
                let mut addrs = BTreeSet::new();
                for t in &targets {
                    match tokio::net::lookup_host(t.as_str()).await {
                        Ok(found) => addrs.extend(found),
                        Err(e) => {
                            tracing::warn!(peers = %t, error = %e, "peers do not resolve");
                            return None;
                        }
                    }
                }
                Some(addrs)
            })
        });
        match tokio::time::timeout(TIMEOUT, lookup).await {
            Ok(done) => {
                *pending = None;
                done.ok().flatten()
            }
            Err(_) => {
                tracing::warn!(peers = ?self.targets, "peers do not resolve in time");
                None
            }
        }
    }

    /// Every peer's load that could be read now, except `own`'s.
    pub(super) async fn read(&self, own: &str) -> Reading {
        if self.targets.is_empty() {
            return Reading {
                loads: Vec::new(),
                missing: 0,
            };
        }
        let Some(addrs) = self.resolve().await else {
            return Reading {
                loads: Vec::new(),
                missing: 1,
            };
        };
        let answers = futures::future::join_all(
            addrs
                .iter()
                .map(|&a| async move { (a, fetch(a).await, Instant::now()) }),
        )
        .await;
        let mut loads = Vec::new();
        let mut seen = HashSet::new();
        let mut missing = 0;
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        let mut answered = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        for (addr, answer, at) in answers {
            match answer {
                Ok(mut load) => {
                    answered.insert(addr, at);
                    if failing.remove(&addr) {
                        tracing::info!(peer = %addr, "peer answers again");
                    }
                    if load.proxy.is_empty() {
                        // A replica of an older version names no id: its address does.
                        load.proxy = format!("address {addr}");
                    }
                    if load.proxy != own && seen.insert(load.proxy.clone()) {
                        loads.push((at, load));
                    }
                }
                Err(e) => {
                    let recent = answered
                        .get(&addr)
                        .is_some_and(|t| at.saturating_duration_since(*t) < FORGET);
                    if recent {
                        missing += 1;
                    }
                    if failing.insert(addr) {
                        if recent {
                            tracing::warn!(peer = %addr, error = %e, "cannot read a peer's load; its last reading counts for 3 s, and no cluster scales down while it is missing (at most 2 min)");
                        } else {
                            tracing::info!(peer = %addr, error = %e, "a listed peer does not answer and has not answered for 2 min: left out of the sum");
                        }
                    }
                }
            }
        }
        // Addresses gone from DNS are no longer failing, nor remembered.
        failing.retain(|a| addrs.contains(a));
        answered.retain(|a, _| addrs.contains(a));
        Reading { loads, missing }
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

/// Folds `readings` (each with when it was taken) into `sources` (by proxy id) and returns
/// each cluster the proxy `own` serves, summed over every proxy heard from within [`STALE`] of
/// `now`: (in flight, requests per second). Other clusters (a peer a moment behind still
/// serving one this proxy has dropped) are not summed.
pub(super) fn sum(
    sources: &mut HashMap<String, Source>,
    readings: Vec<(Duration, ProxyLoad)>,
    now: Duration,
    own: &str,
) -> HashMap<String, (f64, f64)> {
    for (at, r) in readings {
        let prev = sources.remove(&r.proxy);
        let clusters = r
            .clusters
            .into_iter()
            .map(|c| {
                // A counter is per proxy: its rate comes from its own previous reading, over
                // the time between the two readings' arrivals.
                let rps = prev
                    .as_ref()
                    .filter(|p| at > p.at)
                    .and_then(|p| p.clusters.get(&c.cluster).map(|x| (p.at, x.1)))
                    .map_or(0.0, |(then, answered)| {
                        c.answered.saturating_sub(answered) as f64 / (at - then).as_secs_f64()
                    });
                (c.cluster, (c.inflight, c.answered, rps))
            })
            .collect();
        sources.insert(r.proxy, Source { at, clusters });
    }
    sources.retain(|_, s| now.saturating_sub(s.at) <= STALE);
    let mut out: HashMap<String, (f64, f64)> = HashMap::new();
    let Some(serving) = sources.get(own).map(|s| &s.clusters) else {
        return out;
    };
    for s in sources.values() {
        for (cluster, &(inflight, _, rps)) in &s.clusters {
            if !serving.contains_key(cluster) {
                continue;
            }
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
            vec![
                (s(10), reading("a", 1, 100)),
                (s(10), reading("b", 2, 5000)),
            ],
            s(10),
            "a",
        );
        // b restarted (a new id, its counter from zero): no negative or huge rate.
        let got = sum(
            &mut sources,
            vec![(s(11), reading("a", 3, 120)), (s(11), reading("b2", 4, 0))],
            s(11),
            "a",
        );
        // b's last reading still counts (within STALE), with its rate (0: one reading).
        assert_eq!(got["web"], (3.0 + 4.0 + 2.0, 20.0));
        let got = sum(
            &mut sources,
            vec![(s(15), reading("a", 3, 140)), (s(15), reading("b2", 4, 10))],
            s(15),
            "a",
        );
        // b gone for 5 s: dropped. a: 20 over 4 s; b2: 10 over 4 s.
        assert_eq!(got["web"], (7.0, 5.0 + 2.5));
        // A rate is over the time between a proxy's own readings, not between samples: a
        // reading that arrived late (a slow peer held the sample up) is not a burst.
        let ms = |ms| Duration::from_millis(ms);
        let got = sum(
            &mut sources,
            vec![(ms(15_200), reading("a", 0, 160))],
            ms(16_000),
            "a",
        );
        assert_eq!(got["web"].1, 20.0 / 0.2 + 2.5);
        // A cluster this proxy no longer serves is not summed from a lagging peer.
        let stopped = ProxyLoad {
            proxy: "a".into(),
            clusters: Vec::new(),
        };
        assert!(sum(&mut sources, vec![(s(16), stopped)], s(16), "a").is_empty());
        // Nobody heard from for longer than STALE: nothing.
        assert!(sum(&mut sources, Vec::new(), s(30), "a").is_empty());
    }
}
