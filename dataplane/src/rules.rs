//! Host and path rules: which cluster(s) a request goes to, found in time independent of the
//! number of rules.
//!
//! A rule is a host (exact, `*.example.com` for one leading label, or none: any host) and a path
//! prefix, with one cluster or several sharing it by weight. Precedence: the exact host's rules,
//! then the wildcard's, then the host-less ones; within each, the longest matching prefix. A
//! request that matches a host but none of its prefixes falls through to the next kind (a
//! host-less `/` rule is a catch-all under every host). Hosts compare case-insensitively, without
//! the port or a trailing dot.
//!
//! Lookup: one hash lookup per host kind, then, per kind, one hash lookup per `/` boundary of
//! the path no longer than the kind's longest prefix (at most 256 bytes): no scan over rules.

use std::borrow::Cow;
use std::collections::HashMap;

/// One rule's backends: each with its weight (`None`: not split, one backend alone).
#[derive(Debug)]
pub(crate) struct Rule<T> {
    pub backends: Vec<(T, Option<u32>)>,
}

/// Prefixes of one host kind.
#[derive(Debug)]
pub(crate) struct Paths<T> {
    by_prefix: HashMap<Box<str>, Rule<T>>,
    max_len: usize,
}

impl<T> Default for Paths<T> {
    fn default() -> Self {
        Self {
            by_prefix: HashMap::new(),
            max_len: 0,
        }
    }
}

impl<T> Paths<T> {
    fn insert(&mut self, prefix: &str, backend: T, weight: Option<u32>) {
        self.max_len = self.max_len.max(prefix.len());
        self.by_prefix
            .entry(prefix.into())
            .or_insert_with(|| Rule {
                backends: Vec::new(),
            })
            .backends
            .push((backend, weight));
    }

    /// The rule of the longest prefix matching `path` (segment-aligned: `/a` matches `/a` and
    /// `/a/x`, not `/ab`).
    fn find(&self, path: &str) -> Option<&Rule<T>> {
        if self.by_prefix.is_empty() {
            return None;
        }
        if path.len() <= self.max_len
            && let Some(r) = self.by_prefix.get(path)
        {
            return Some(r);
        }
        let bytes = path.as_bytes();
        let top = (path.len().saturating_sub(1)).min(self.max_len);
        for i in (1..=top).rev() {
            if bytes[i] == b'/'
                && let Some(r) = self.by_prefix.get(&path[..i])
            {
                return Some(r);
            }
        }
        if path.starts_with('/') {
            self.by_prefix.get("/")
        } else {
            None
        }
    }
}

/// Every rule of a route table.
#[derive(Debug)]
pub(crate) struct Rules<T> {
    exact: HashMap<Box<str>, Paths<T>>,
    /// By the wildcard's parent domain (`*.example.com` under `example.com`).
    wildcard: HashMap<Box<str>, Paths<T>>,
    any: Paths<T>,
}

impl<T> Default for Rules<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            any: Paths::default(),
        }
    }
}

impl<T: Clone> Rules<T> {
    /// Adds `backend` under each of `hosts` (none: any host) at `prefix`.
    pub fn insert(&mut self, hosts: &[String], prefix: &str, backend: T, weight: Option<u32>) {
        if hosts.is_empty() {
            self.any.insert(prefix, backend, weight);
            return;
        }
        for h in hosts {
            let h = normalize_host(h);
            let paths = match h.strip_prefix("*.") {
                Some(parent) => self.wildcard.entry(parent.into()).or_default(),
                None => self.exact.entry(h.as_ref().into()).or_default(),
            };
            paths.insert(prefix, backend.clone(), weight);
        }
    }
}

impl<T> Rules<T> {
    /// The rule for a request to `host` (as [`request_host`] gives it) and `path`.
    pub fn find(&self, host: &str, path: &str) -> Option<&Rule<T>> {
        if !host.is_empty() {
            if let Some(r) = self.exact.get(host).and_then(|p| p.find(path)) {
                return Some(r);
            }
            if let Some((label, parent)) = host.split_once('.')
                && !label.is_empty()
                && let Some(r) = self.wildcard.get(parent).and_then(|p| p.find(path))
            {
                return Some(r);
            }
        }
        self.any.find(path)
    }
}

/// `host` lower-cased, without a port or a trailing dot (`Shop.Example.COM.:8080` ->
/// `shop.example.com`; `[::1]:80` -> `[::1]`). Borrowed when already in that form.
pub fn normalize_host(host: &str) -> Cow<'_, str> {
    let host = if host.starts_with('[') {
        // An IPv6 literal: up to its closing bracket.
        host.find(']').map_or(host, |i| &host[..=i])
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// The host a request is for: the URI's authority (HTTP/2 `:authority`, an absolute-form
/// HTTP/1.1 target) or else the `Host` header, normalized; empty when there is none.
pub(crate) fn request_host<B>(req: &http::Request<B>) -> Cow<'_, str> {
    if let Some(h) = req.uri().host() {
        return normalize_host(h);
    }
    req.headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map_or(Cow::Borrowed(""), normalize_host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(list: &[(&[&str], &str, &'static str)]) -> Rules<&'static str> {
        let mut r = Rules::default();
        for (hosts, prefix, name) in list {
            let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
            r.insert(&hosts, prefix, *name, None);
        }
        r
    }

    fn find(r: &Rules<&'static str>, host: &str, path: &str) -> Option<&'static str> {
        r.find(&normalize_host(host), path)
            .map(|rule| rule.backends[0].0)
    }

    #[test]
    fn exact_then_wildcard_then_any_host_and_the_longest_prefix_within() {
        let r = rules(&[
            (&["shop.example.com"], "/", "shop"),
            (&["shop.example.com"], "/api", "shop-api"),
            (&["*.example.com"], "/", "wild"),
            (&["*.example.com"], "/api/v2", "wild-v2"),
            (&[], "/", "default"),
            (&[], "/cluster1", "cluster1"),
        ]);
        assert_eq!(find(&r, "shop.example.com", "/"), Some("shop"));
        assert_eq!(find(&r, "shop.example.com", "/api/x"), Some("shop-api"));
        assert_eq!(find(&r, "shop.example.com", "/apix"), Some("shop"));
        // The exact host wins over the wildcard even where the wildcard's prefix is longer.
        assert_eq!(find(&r, "shop.example.com", "/api/v2/x"), Some("shop-api"));
        assert_eq!(find(&r, "blog.example.com", "/api/v2/x"), Some("wild-v2"));
        assert_eq!(find(&r, "blog.example.com", "/cluster1"), Some("wild"));
        // One label only: a deeper name and the bare parent are not the wildcard's.
        assert_eq!(find(&r, "a.b.example.com", "/cluster1"), Some("cluster1"));
        assert_eq!(find(&r, "example.com", "/x"), Some("default"));
        assert_eq!(find(&r, ".example.com", "/x"), Some("default"));
        assert_eq!(find(&r, "", "/cluster1/a"), Some("cluster1"));
        assert_eq!(find(&r, "other.org", "/cluster10"), Some("default"));
    }

    #[test]
    fn hosts_compare_without_case_port_or_trailing_dot() {
        let r = rules(&[(&["Shop.Example.com"], "/", "shop")]);
        for host in [
            "shop.example.com",
            "SHOP.EXAMPLE.COM",
            "shop.example.com:8443",
            "shop.example.com.",
            "Shop.Example.Com.:80",
        ] {
            assert_eq!(find(&r, host, "/"), Some("shop"), "{host}");
        }
        assert_eq!(find(&r, "shop.example.co", "/"), None);
        assert_eq!(normalize_host("[::1]:8000"), "[::1]");
        assert_eq!(normalize_host("[::1]"), "[::1]");
    }

    #[test]
    fn no_match_is_none_and_prefixes_are_segment_aligned() {
        let r = rules(&[(&[], "/cluster1", "c1"), (&["a.com"], "/x/y", "xy")]);
        assert_eq!(find(&r, "", "/cluster10"), None);
        assert_eq!(find(&r, "", "/"), None);
        assert_eq!(find(&r, "a.com", "/x/y/z"), Some("xy"));
        assert_eq!(find(&r, "a.com", "/x/yz"), None);
        assert_eq!(find(&r, "a.com", "/x"), None);
        assert_eq!(find(&r, "", "*"), None);
    }

    #[test]
    fn matches_what_a_scan_over_every_rule_would() {
        // The old linear scan (longest segment-aligned prefix) is the oracle for host-less rules.
        let prefixes = ["/", "/a", "/a/b", "/a/b/c", "/ab", "/b/c", "/cluster1"];
        let mut r = Rules::default();
        for p in prefixes {
            r.insert(&[], p, p, None);
        }
        for path in [
            "/",
            "/a",
            "/a/",
            "/a/b",
            "/a/bc",
            "/a/b/c/d",
            "/ab/c",
            "/abc",
            "/b",
            "/b/c/",
            "/x",
            "/cluster1/a//b",
        ] {
            let scan = prefixes
                .iter()
                .filter(|p| crate::routes::prefix_matches(p, path))
                .max_by_key(|p| p.len())
                .copied();
            assert_eq!(find(&r, "", path), scan, "{path}");
        }
    }
}
