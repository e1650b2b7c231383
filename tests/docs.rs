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
