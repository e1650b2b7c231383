//! fleetlb's own upstream client on arbitrary upstream answers (heads, interim 1xx heads,
//! chunked, length and close-delimited bodies): never panics; a framed answer is a final
//! status (never 1xx) and its body is never longer than the bytes that came.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head_request, data) = match data.split_first() {
        Some((flag, rest)) => (flag & 1 == 1, rest),
        None => return,
    };
    if let Some((status, body)) = fleetlb_dataplane::fuzzing::frame_response(data, head_request) {
        assert!((200..=999).contains(&status), "status {status}");
        assert!(body.len() <= data.len());
        if head_request || status == 204 || status == 304 {
            assert!(body.is_empty());
        }
    }
});
