//! A REST query string, decoded, parsed as a Feathers query and built into SQL.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    let Ok(query) = quill::transport::qs::decode(input) else {
        return;
    };
    let _ = quill::fuzzing::find(&query);
});
