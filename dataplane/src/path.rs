//! The request-path rule: fleetlb routes on, and forwards, the **normalised** path, so fleetlb
//! and the backend always agree on what was asked for and no path escapes its route prefix.
//!
//! - Dot segments are resolved (RFC 3986 5.2.4), including percent-encoded dots (`%2e`):
//!   `/cluster1/../cluster2/x` is routed, and forwarded, as `/cluster2/x`. A `..` above the
//!   root is refused (400).
//! - Repeated slashes are merged (`//cluster1///x` is `/cluster1/x`), as nginx does.
//! - Encoded slashes and backslashes (`%2F`, `%5C`) are refused (400): backends disagree on
//!   whether they separate segments, so no choice of fleetlb's would be safe (Envoy's
//!   `REJECT_REQUEST` option).
//! - Anything else (other percent-encodings, the query) is forwarded byte for byte.
//!
//! The common case (a path with none of these) is checked in one pass without allocating.

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not an origin-form path (does not start with `/`).
    NotAbsolute,
    /// `%2F` or `%5C` in the path.
    EncodedSlash,
    /// A `..` segment above the root.
    AboveRoot,
}

/// The normalised form of `path` (no query), or `None` when it is already normal.
pub fn normalize(path: &str) -> Result<Option<String>, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut needs = false;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'%' => {
                let hex = (b.get(i + 1).copied(), b.get(i + 2).copied());
                match hex {
                    (Some(b'2'), Some(b'f' | b'F')) | (Some(b'5'), Some(b'c' | b'C')) => {
                        return Err(PathError::EncodedSlash);
                    }
                    (Some(b'2'), Some(b'e' | b'E')) => needs = true,
                    _ => {}
                }
            }
            b'\\' => return Err(PathError::EncodedSlash),
            b'/' => {
                if matches!(b.get(i + 1), Some(b'/') | Some(b'.')) {
                    needs = true;
                }
            }
            _ => {}
        }
    }
    if !needs {
        return Ok(None);
    }
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in path[1..].split('/') {
        trailing = false;
        match dots(seg) {
            _ if seg.is_empty() => trailing = true,
            Some(1) => trailing = true,
            Some(2) => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing = true;
            }
            _ => out.push(seg),
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing || out.is_empty() {
        s.push('/');
    }
    Ok(if s == path { None } else { Some(s) })
}

/// `Some(1)` for a `.` segment, `Some(2)` for `..` (either possibly written `%2e`).
fn dots(seg: &str) -> Option<u8> {
    let mut n = 0u8;
    let mut rest = seg.as_bytes();
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1] == b'2' && rest[2] | 0x20 == b'e' {
            rest = &rest[3..];
        } else {
            return None;
        }
        n += 1;
        if n > 2 {
            return None;
        }
    }
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_paths_are_left_alone() {
        for p in [
            "/",
            "/cluster1",
            "/cluster1/",
            "/a/b.c/d",
            "/a/.well-known",
            "/a/%20b",
            "/a/b..c",
        ] {
            assert_eq!(normalize(p), Ok(None), "{p}");
        }
    }

    #[test]
    fn dot_segments_and_repeated_slashes_are_resolved() {
        let cases = [
            ("/cluster1/../cluster2/x", "/cluster2/x"),
            ("/cluster1/./x", "/cluster1/x"),
            ("//cluster1///x", "/cluster1/x"),
            ("/cluster1/x/..", "/cluster1/"),
            ("/cluster1/%2e%2E/cluster2", "/cluster2"),
            ("/a/.", "/a/"),
            ("/a/b/../../c", "/c"),
            ("/..a/b", "/..a/b"),
        ];
        for (p, want) in cases {
            let got = normalize(p).unwrap().unwrap_or_else(|| p.to_string());
            assert_eq!(got, want, "{p}");
        }
    }

    #[test]
    fn escapes_are_refused() {
        assert_eq!(normalize("/.."), Err(PathError::AboveRoot));
        assert_eq!(normalize("/a/../../etc"), Err(PathError::AboveRoot));
        assert_eq!(normalize("/a/%2e%2e/%2E%2E/x"), Err(PathError::AboveRoot));
        assert_eq!(
            normalize("/cluster1%2F..%2Fcluster2"),
            Err(PathError::EncodedSlash)
        );
        assert_eq!(normalize("/a%5cb"), Err(PathError::EncodedSlash));
        assert_eq!(normalize("/a\\b"), Err(PathError::EncodedSlash));
        assert_eq!(normalize("*"), Err(PathError::NotAbsolute));
    }
}
