//! The agent's config: any text either parses and validates or is refused
//! with a typed error, never panics; a valid config written as YAML (as the
//! agent stores the config it serves from while the API server is away)
//! reads back the same.
#![no_main]

use edgewire_api::AgentConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = AgentConfig::parse(text) else {
        return;
    };
    let yaml = config
        .to_yaml()
        .unwrap_or_else(|e| panic!("{config:?} cannot be written: {e}"));
    let again =
        AgentConfig::parse(&yaml).unwrap_or_else(|e| panic!("written back:\n{yaml}\ndoes not parse: {e}"));
    assert_eq!(again, config);
});
