//! `cargo +nightly fuzz run parse_iptables_save` from planner/.
//!
//! The parser must never panic, whatever the bytes; and whatever it accepts
//! must serialize (the node report embeds the model as JSON).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match kubeshift_planner::iptables::parse_iptables_save("fuzz", text) {
        Ok(model) => {
            let json = serde_json::to_string(&model).expect("model serializes");
            assert!(!json.is_empty());
            for s in &model.services {
                for e in &s.endpoints {
                    assert!((0.0..=1.0).contains(&e.probability));
                    assert!(e.share >= -1e-9 && e.share <= 1.0 + 1e-9);
                }
            }
        }
        Err(e) => {
            // Errors always name the input and a line.
            assert!(e.to_string().starts_with("fuzz:"));
        }
    }
});
