//! fleetlb's own HTTP/1.1 server side reads request heads as hyper's does: the same heads are
//! served (with the same method, target and body framing) and the same ones refused, with the
//! same status. The fuzz target `request_head` searches for a difference; this replays its
//! seeds and a few thousand deterministic mutations of them on every test run.

use fleetlb_dataplane::fuzzing::{Took, fleetlb_takes, request_head_differential};

fn seeds() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/request_head");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .expect("the fuzz seeds")
        .map(|e| std::fs::read(e.expect("a seed").path()).expect("a seed"))
        .collect();
    seeds.sort();
    seeds
}

#[test]
fn the_seeds_are_taken_as_hyper_takes_them() {
    let seeds = seeds();
    assert!(seeds.len() >= 10, "seeds missing");
    let mut served = 0;
    for s in &seeds {
        if let Err(e) = request_head_differential(s) {
            panic!("{e}");
        }
        served += usize::from(matches!(fleetlb_takes(s), Took::Served(..)));
    }
    // Both outcomes are exercised, not only one.
    assert!(
        served >= 5 && served < seeds.len(),
        "{served} of {} served",
        seeds.len()
    );
}

#[test]
fn mutated_heads_are_taken_as_hyper_takes_them() {
    let seeds = seeds();
    let mut rng = fastrand::Rng::with_seed(23);
    let alphabet =
        b"\r\n\t :;,\x00\x7f\x80GETPOSTHTTP/1.01chunkedContent-LengthTransfer-Encoding0123456789";
    let mut mismatches = Vec::new();
    for _ in 0..20_000 {
        let mut d = seeds[rng.usize(..seeds.len())].clone();
        for _ in 0..rng.usize(1..4) {
            let at = rng.usize(..=d.len());
            match rng.u8(..3) {
                0 if at < d.len() => d[at] = alphabet[rng.usize(..alphabet.len())],
                1 if at < d.len() => {
                    d.remove(at);
                }
                _ => d.insert(at, alphabet[rng.usize(..alphabet.len())]),
            }
        }
        if let Err(e) = request_head_differential(&d) {
            mismatches.push(e);
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches, e.g.:\n{}",
        mismatches.len(),
        mismatches
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
