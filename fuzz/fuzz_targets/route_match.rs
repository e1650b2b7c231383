//! Route matching and path normalisation: never panics; a normalised path is normal (idempotent,
//! absolute, without dot segments, repeated slashes or encoded slashes); a route prefix matches
//! only at segment boundaries.
#![no_main]

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
    }
});
