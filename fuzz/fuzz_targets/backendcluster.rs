//! BackendCluster parsing from arbitrary YAML: never panics; what is accepted passes validation
//! and survives a JSON round trip unchanged; what is refused is refused with a message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

fuzz_target!(|text: &str| {
    for de in serde_yaml_ng::Deserializer::from_str(text).take(8) {
        let Ok(value) = serde_yaml_ng::Value::deserialize(de) else {
            return;
        };
        let Ok(json) = serde_json::to_value(&value) else {
            continue;
        };
        match fleetlb_crds::from_json(json) {
            Ok(bc) => {
                assert!(bc.validate().is_ok());
                let again = fleetlb_crds::from_json(serde_json::to_value(&bc).unwrap())
                    .expect("an accepted object re-reads");
                assert_eq!(again.spec, bc.spec);
                assert_eq!(again.status, bc.status);
                assert_eq!(again.metadata, bc.metadata);
            }
            Err(e) => assert!(!e.is_empty()),
        }
    }
});
