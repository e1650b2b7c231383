//! The reference in docs/ says what the code does: tables made from the code are kept equal.

use std::path::Path;

const BEGIN: &str = "<!-- limits table: made from fleetlb_dataplane::Limits::markdown() -->\n";
const END: &str = "<!-- end of limits table -->";

/// `docs/limits.md` holds the table of every limit, made from the struct that the flags come
/// from. `FLEETLB_BLESS=1 cargo test --test docs` writes it anew after a change.
#[test]
fn the_limits_table_in_the_docs_is_the_one_the_flags_come_from() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/limits.md");
    let text = std::fs::read_to_string(&path).expect("docs/limits.md exists");
    let (before, rest) = text.split_once(BEGIN).expect("the table's opening marker");
    let (table, after) = rest.split_once(END).expect("the table's closing marker");
    let made = fleetlb_dataplane::Limits::markdown();
    if std::env::var_os("FLEETLB_BLESS").is_some() {
        std::fs::write(&path, format!("{before}{BEGIN}{made}{END}{after}")).unwrap();
        return;
    }
    assert_eq!(
        table, made,
        "docs/limits.md is out of date: run FLEETLB_BLESS=1 cargo test --test docs"
    );
}

/// Replaces what lies between `begin` and `end` in `path` with `made` under `FLEETLB_BLESS`,
/// else asserts it is `made`.
fn generated(path: &str, begin: &str, end: &str, made: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let (before, rest) = text.split_once(begin).expect("the opening marker");
    let (old, after) = rest.split_once(end).expect("the closing marker");
    if std::env::var_os("FLEETLB_BLESS").is_some() {
        std::fs::write(&path, format!("{before}{begin}{made}{end}{after}")).unwrap();
        return;
    }
    assert_eq!(
        old,
        made,
        "{} is out of date: run FLEETLB_BLESS=1 cargo test --test docs",
        path.display()
    );
}

/// One table row per field of the CRD's schema, depth first: path, type, constraints, the
/// field's own description.
fn schema_rows(path: &str, schema: &serde_json::Value, required: bool, out: &mut String) {
    let ty = match (schema["type"].as_str(), schema["items"]["type"].as_str()) {
        (Some("array"), Some(item)) => format!("[]{item}"),
        (Some(t), _) => t.to_string(),
        (None, _) if schema.get("x-kubernetes-int-or-string").is_some() => "int or string".into(),
        _ => "object".into(),
    };
    let mut rules = Vec::new();
    if required {
        rules.push("required".to_string());
    }
    if let Some(d) = schema.get("default") {
        rules.push(format!("default `{d}`"));
    }
    for (k, name) in [
        ("minimum", "min"),
        ("maximum", "max"),
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
    ] {
        if let Some(v) = schema.get(k) {
            let v = match v.as_f64() {
                Some(f) if f.fract() == 0.0 => format!("{}", f as i64),
                _ => v.to_string(),
            };
            rules.push(format!("{name} {v}"));
        }
    }
    if let Some(e) = schema["enum"].as_array() {
        let values: Vec<String> = e
            .iter()
            .map(|v| format!("`{}`", v.as_str().unwrap_or(&v.to_string())))
            .collect();
        rules.push(format!("one of {}", values.join(", ")));
    }
    if let Some(p) = schema["pattern"].as_str() {
        rules.push(format!("pattern `{p}`"));
    }
    let description = schema["description"]
        .as_str()
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|");
    if !path.is_empty() {
        out.push_str(&format!(
            "| `{path}` | {ty} | {} | {description} |\n",
            rules.join("; ")
        ));
    }
    let (props, req) = match schema["type"].as_str() {
        Some("array") => (&schema["items"]["properties"], &schema["items"]["required"]),
        _ => (&schema["properties"], &schema["required"]),
    };
    let required: Vec<&str> = req
        .as_array()
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if let Some(props) = props.as_object() {
        let suffix = if schema["type"] == "array" { "[]" } else { "" };
        for (name, field) in props {
            let child = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}{suffix}.{name}")
            };
            schema_rows(&child, field, required.contains(&name.as_str()), out);
        }
    }
}

/// `docs/reference/backendcluster.md` holds every field of the CRD's schema (the one the API
/// server and `fleetlb validate` check), made from it.
#[test]
fn the_backendcluster_reference_is_made_from_the_crd_schema() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(fleetlb_crds::BackendCluster::crd()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut made = String::from("| field | type | rules | what it is |\n|---|---|---|---|\n");
    schema_rows(
        "",
        &serde_json::json!({"properties": {"spec": schema["properties"]["spec"]}, "required": ["spec"]}),
        false,
        &mut made,
    );
    generated(
        "docs/reference/backendcluster.md",
        "<!-- spec table: made from the CRD schema -->\n",
        "<!-- end of spec table -->",
        &made,
    );
}

/// `docs/reference/cli.md` holds every command's `--help`, as the binary prints it.
#[test]
fn the_cli_reference_is_made_from_the_binarys_help() {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetlb"))
            .args(args)
            .env("COLUMNS", "100")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let mut made = format!("```\n$ fleetlb --help\n{}```\n", help(&["--help"]));
    for cmd in [
        "demo",
        "standalone",
        "run",
        "validate",
        "crd",
        "iam-policy",
        "status",
        "bench",
        "backend",
    ] {
        made.push_str(&format!(
            "\n## fleetlb {cmd}\n\n```\n$ fleetlb {cmd} --help\n{}```\n",
            help(&[cmd, "--help"])
        ));
    }
    generated(
        "docs/reference/cli.md",
        "<!-- made from `fleetlb COMMAND --help` -->\n",
        "<!-- end of help -->",
        &made,
    );
}

/// Every relative link in README.md and docs/ leads to a file that exists (pages moved without
/// their links fail here).
#[test]
fn every_relative_link_in_the_docs_leads_somewhere() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                pages.push(p);
            }
        }
    }
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap();
            if target.is_empty() || target.contains("://") || target.contains(' ') {
                continue;
            }
            if !page.parent().unwrap().join(target).exists() {
                broken.push(format!("{}: {target}", page.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links to nowhere:\n{}",
        broken.join("\n")
    );
}
