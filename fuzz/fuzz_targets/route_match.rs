//! Route matching and path normalisation: never panics; a normalised path is normal (idempotent,
//! absolute, without dot segments, repeated slashes or encoded slashes); a route prefix matches
//! only at segment boundaries; the rule table (hash lookups per `/` boundary) finds the same
//! route as a scan over every prefix (`|` separates several prefixes in the input).
#![no_main]

use fleetlb_dataplane::fuzzing::longest_route;
use fleetlb_dataplane::path::normalize;
use fleetlb_dataplane::routes::prefix_matches;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: (&str, &str)| {
    let (prefix, path) = data;
    if let Ok(n) = normalize(path) {
        let p = n.as_deref().unwrap_or(path);
        assert!(p.starts_with('/'));
        assert_eq!(normalize(p), Ok(None), "normalising {path:?} twice changed it");
        assert!(!p.contains("//"), "{p:?}");
        for seg in p.split('/') {
            assert!(seg != "." && seg != "..", "{p:?}");
        }
        if prefix.starts_with('/') && prefix != "/" && prefix_matches(prefix, p) {
            let rest = &p[prefix.len()..];
            assert!(rest.is_empty() || rest.starts_with('/'));
        }
        // Route prefixes as the schema allows them: absolute, no trailing slash but `/` itself.
        let prefixes: Vec<&str> = prefix
            .split('|')
            .filter(|x| x.starts_with('/') && (*x == "/" || !x.ends_with('/')))
            .collect();
        let scan = prefixes
            .iter()
            .filter(|x| prefix_matches(x, p))
            .max_by_key(|x| x.len())
            .copied();
        assert_eq!(longest_route(&prefixes, p), scan, "{prefixes:?} {p:?}");
    }
});
