//! A Feathers query as JSON (what socket.io and /ws clients send), parsed and built into SQL.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if let Ok(query) = serde_json::from_slice::<serde_json::Value>(input) {
        let _ = quill::fuzzing::find(&query);
    }
});
