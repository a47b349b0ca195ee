//! A `/ws` text frame, decoded into a request (and its query, if it has one).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    let _ = quill::fuzzing::ws_frame(input);
});
