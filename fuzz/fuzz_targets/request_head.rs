//! Differential: fleetlb's own HTTP/1.1 server side and hyper's take every request head alike:
//! the same heads served, with the same method, target and body framing (none, a length,
//! chunked), and the same ones refused with the same status. A difference is a finding: a
//! head one of them frames differently is a request-smuggling risk in front of the other.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(diff) = fleetlb_dataplane::fuzzing::request_head_differential(data) {
        panic!("{diff}");
    }
});
