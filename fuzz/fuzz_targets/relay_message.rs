//! A relay client's text frame: any input either parses or is refused with a
//! typed error, never panics; whatever parses is written back by the agent
//! (`to_json`) in a form that parses to the same message.
#![no_main]

use edgewire_api::wire::parse_client_message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(message) = parse_client_message(text) else {
        return;
    };
    let again = parse_client_message(&message.to_json())
        .unwrap_or_else(|e| panic!("{message:?} written back does not parse: {e:?}"));
    assert_eq!(again, message);
});
