//! A socket.io event's arguments (`["find", "messages", {...}]`), decoded into a call.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    let _ = quill::fuzzing::socketio_event(input);
});
