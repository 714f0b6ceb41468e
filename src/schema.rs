//! The checked-in files under `schemas/`: JSON Schemas generated from the Rust types an
//! operator writes (config, provider YAML) or reads (canonical event, effects), and the
//! machine's graph. A test compares them with what the code generates now.
//!
//! What this module must never do: be edited by hand: the files are generated
//! (`MEMBERSYNC_WRITE_SCHEMAS=1`).

use crate::canonical::CanonicalEvent;
use crate::config::ConfigFile;
use crate::effects::Effect;
use crate::machine::graph;
use crate::spec::ProviderSpec;

fn schema<T: schemars::JsonSchema>() -> String {
    serde_json::to_string_pretty(&schemars::schema_for!(T)).expect("schema serializes") + "\n"
}

/// (file name under `schemas/`, contents).
pub fn all() -> Vec<(&'static str, String)> {
    vec![
        ("config.schema.json", schema::<ConfigFile>()),
        ("provider.schema.json", schema::<ProviderSpec>()),
        ("canonical-event.schema.json", schema::<CanonicalEvent>()),
        ("effect.schema.json", schema::<Effect>()),
        ("membership.graph.json", graph::to_json()),
        ("membership.mmd", graph::to_mermaid()),
        ("openapi.json", crate::openapi::document(&crate::app::api().1)),
    ]
}
