//! BackendCluster manifests read from a directory, for the standalone driver.
//!
//! Every `*.yaml` / `*.yml` file directly in the directory (hidden files skipped) may hold one or
//! many `---`-separated documents. Each document is checked like the API server would: kind and
//! apiVersion, `metadata.name` as a DNS label, the schema's types (with the path of a mistyped
//! field), then [`BackendCluster::validate`]. Problems come back as one line per object naming
//! file, object, field and problem, e.g.
//! `examples/invalid/replicas.yaml: BackendCluster default/too-many (document 1): spec.replicas: 5000 is greater than the maximum of 1000`.

use std::path::{Path, PathBuf};

use fleetlb_crds::BackendCluster;
use serde::Deserialize;

use crate::provider::{ClusterKey, fnv64};

/// One parsed file.
#[derive(Debug)]
pub struct FileLoad {
    /// Path as given (directory joined with file name).
    pub path: PathBuf,
    /// The documents, or why the file as a whole could not be read (then none of it applies).
    pub outcome: Result<Vec<Doc>, String>,
}

/// One document of a file.
#[derive(Debug)]
pub struct Doc {
    /// 1-based position in the file.
    pub index: usize,
    /// The object's key when the document names one (also for invalid documents).
    pub key: Option<ClusterKey>,
    /// The valid object, or the error line.
    pub result: Result<BackendCluster, String>,
}

/// What reading one file gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileText {
    /// Its text.
    Text(String),
    /// Why it could not be read (not cached: the next poll tries again).
    Unreadable(String),
}

/// The manifest files of `dir` and a hash of their names and contents (to detect changes).
pub fn read_dir(dir: &Path) -> std::io::Result<(u64, Vec<(PathBuf, FileText)>)> {
    read_dir_cached(dir, &mut FileCache::default())
}

/// What a directory's files held when last read, so a poll reads only the files whose size,
/// modification or status-change time or inode changed (a Kubernetes ConfigMap volume swaps a symlink: the
/// inode changes) and otherwise costs one `stat` per file.
#[derive(Default)]
pub struct FileCache {
    files: std::collections::HashMap<PathBuf, (FileStamp, String)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    /// Inode and status-change time (a permission change makes an unreadable file readable).
    inode: u64,
    changed: (i64, i64),
}

impl FileStamp {
    /// Changed within the last 2 s: a file rewritten in place within one timestamp tick of
    /// being read looks unchanged, so such a file is read again until its stamp is older
    /// (git's "racily clean" rule).
    fn recent(&self) -> bool {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let modified = self
            .modified
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(secs, |d| d.as_secs() as i64);
        secs - modified.max(self.changed.0) < 2
    }

    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let (inode, changed) = {
            use std::os::unix::fs::MetadataExt;
            (meta.ino(), (meta.ctime(), meta.ctime_nsec()))
        };
        #[cfg(not(unix))]
        let (inode, changed) = (0, (0, 0));
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
            changed,
        }
    }
}

/// [`read_dir`] reading only what changed since `cache` last saw it.
pub fn read_dir_cached(
    dir: &Path,
    cache: &mut FileCache,
) -> std::io::Result<(u64, Vec<(PathBuf, FileText)>)> {
    let mut files = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if name.starts_with('.') || !is_yaml {
            continue;
        }
        // Follows symlinks, like reading the file does.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let stamp = FileStamp::of(&meta);
        let text = match cache.files.remove(&path) {
            Some((was, text)) if was == stamp && !stamp.recent() => text,
            _ => match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    // Not cached: the next poll tries again (EMFILE and friends pass).
                    files.push((path, FileText::Unreadable(format!("unreadable: {e}"))));
                    continue;
                }
            },
        };
        seen.insert(path.clone(), (stamp, text.clone()));
        files.push((path, FileText::Text(text)));
    }
    cache.files = seen;
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut all = Vec::new();
    for (p, t) in &files {
        all.extend_from_slice(p.to_string_lossy().as_bytes());
        match t {
            FileText::Text(t) => {
                all.push(0);
                all.extend_from_slice(t.as_bytes());
            }
            FileText::Unreadable(why) => {
                all.push(1);
                all.extend_from_slice(why.as_bytes());
            }
        }
        all.push(0);
    }
    Ok((fnv64(&all), files))
}

/// Parses one file's text.
pub fn parse_file(path: &Path, text: &FileText) -> FileLoad {
    let shown = path.display().to_string();
    let text = match text {
        FileText::Text(t) => t,
        FileText::Unreadable(why) => {
            return FileLoad {
                path: path.into(),
                outcome: Err(format!("{shown}: {why}")),
            };
        }
    };
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = match serde_yaml_ng::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                return FileLoad {
                    path: path.into(),
                    outcome: Err(format!("{shown}: document {index}: invalid YAML: {e}")),
                };
            }
        };
        if value.is_null() {
            continue;
        }
        docs.push(parse_doc(&shown, index, value));
    }
    FileLoad {
        path: path.into(),
        outcome: Ok(docs),
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn parse_doc(file: &str, index: usize, value: serde_yaml_ng::Value) -> Doc {
    let str_at =
        |v: &serde_yaml_ng::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let meta = value.get("metadata");
    let name = meta.and_then(|m| str_at(m, "name"));
    let namespace = meta
        .and_then(|m| str_at(m, "namespace"))
        .unwrap_or_else(|| "default".into());
    let key = name.as_ref().map(|n| ClusterKey {
        namespace: namespace.clone(),
        name: n.clone(),
    });
    let who = match &key {
        Some(k) => format!("BackendCluster {}/{}", k.namespace, k.name),
        None => "BackendCluster <unnamed>".to_string(),
    };
    let fail = |problems: String| Doc {
        index,
        key: key.clone(),
        result: Err(format!("{file}: {who} (document {index}): {problems}")),
    };
    let api_version = str_at(&value, "apiVersion");
    if api_version.as_deref() != Some("fleetlb.dev/v1alpha1") {
        return fail(format!(
            "apiVersion: expected fleetlb.dev/v1alpha1, got {}",
            api_version.as_deref().unwrap_or("nothing")
        ));
    }
    let kind = str_at(&value, "kind");
    if kind.as_deref() != Some("BackendCluster") {
        return fail(format!(
            "kind: expected BackendCluster, got {}",
            kind.as_deref().unwrap_or("nothing")
        ));
    }
    match &name {
        None => return fail("metadata.name: required".into()),
        Some(n) if !is_dns_label(n) => {
            return fail(format!(
                "metadata.name: {n:?} must be a DNS label (lowercase letters, digits, '-', at most 63)"
            ));
        }
        Some(_) => {}
    }
    if !is_dns_label(&namespace) {
        return fail(format!(
            "metadata.namespace: {namespace:?} must be a DNS label"
        ));
    }
    // Through JSON: serde_yaml_ng reads enums from `!tags` only, the API's shape is `{local: {}}`.
    let json = match serde_json::to_value(&value) {
        Ok(j) => j,
        Err(e) => return fail(format!("not representable as JSON: {e}")),
    };
    let mut bc = match fleetlb_crds::from_json(json) {
        Ok(bc) => bc,
        Err(e) => return fail(e),
    };
    bc.metadata.namespace = Some(namespace);
    Doc {
        index,
        key,
        result: Ok(bc),
    }
}

/// The first file in `dir` defining a BackendCluster with the `aws` provider, if any (the
/// standalone driver refuses to start without a controller id then).
pub fn first_aws_object(dir: &Path) -> Option<PathBuf> {
    let (_, texts) = read_dir(dir).ok()?;
    texts.iter().find_map(|(path, text)| {
        let load = parse_file(path, text);
        let docs = load.outcome.ok()?;
        docs.into_iter()
            .any(|d| {
                d.result
                    .is_ok_and(|bc| matches!(bc.spec.provider, fleetlb_crds::ProviderSpec::Aws(_)))
            })
            .then(|| path.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(yaml: &str) -> Result<BackendCluster, String> {
        let f = parse_file(Path::new("x.yaml"), &FileText::Text(yaml.into()));
        let mut docs = f.outcome.expect("file parses");
        assert_eq!(docs.len(), 1);
        docs.remove(0).result
    }

    const GOOD: &str = "apiVersion: fleetlb.dev/v1alpha1\nkind: BackendCluster\nmetadata:\n  name: c1\nspec:\n  route: /c1\n  replicas: 2\n  instanceType: t2.micro\n  provider:\n    local: {}\n";

    #[test]
    fn a_valid_document_gets_defaults() {
        let bc = one(GOOD).unwrap();
        assert_eq!(bc.spec.port, 8000);
        assert_eq!(bc.spec.health_check.path, "/health");
        assert_eq!(bc.metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn errors_name_file_object_and_field() {
        let e = one(&GOOD.replace("replicas: 2", "replicas: 5000")).unwrap_err();
        assert_eq!(
            e,
            "x.yaml: BackendCluster default/c1 (document 1): spec.replicas: 5000 is greater than the maximum of 1000"
        );
        let e = one(&GOOD.replace("replicas: 2", "replicas: two")).unwrap_err();
        assert!(e.contains("spec.replicas: invalid type"), "{e}");
        let e = one(&GOOD.replace("route: /c1", "rout: /c1")).unwrap_err();
        assert!(e.contains("spec.rout: unknown field `rout`"), "{e}");
        let e = one(&GOOD.replace(
            "    local: {}",
            "    local: {}\n    static:\n      endpoints: [\"a:1\"]",
        ))
        .unwrap_err();
        assert!(e.contains("spec.provider"), "{e}");
    }

    #[test]
    fn every_shipped_example_is_valid_and_every_invalid_one_is_rejected() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for (dir, valid) in [
            ("", true),
            ("aws", true),
            ("autoscaled", true),
            ("invalid", false),
        ] {
            let (_, files) = read_dir(&root.join(dir)).unwrap();
            assert!(!files.is_empty(), "no examples in {dir:?}");
            for (path, text) in files {
                let load = parse_file(&path, &text);
                let ok = load
                    .outcome
                    .as_ref()
                    .is_ok_and(|docs| docs.iter().all(|d| d.result.is_ok()));
                assert_eq!(ok, valid, "{}: {:?}", path.display(), load.outcome);
            }
        }
    }

    #[test]
    fn several_documents_and_a_broken_file() {
        let f = parse_file(
            Path::new("m.yaml"),
            &FileText::Text(format!("{GOOD}---\n{}", GOOD.replace("c1", "c2"))),
        );
        assert_eq!(f.outcome.unwrap().len(), 2);
        let f = parse_file(
            Path::new("bad.yaml"),
            &FileText::Text("spec: [unclosed".into()),
        );
        let e = f.outcome.unwrap_err();
        assert!(e.starts_with("bad.yaml: document 1: invalid YAML"), "{e}");
    }
}
