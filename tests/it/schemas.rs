//! The checked-in schemas and machine graph match the code; the README draws the same
//! graph. `MEMBERSYNC_WRITE_SCHEMAS=1 cargo test` rewrites them.

use crate::support::root;

#[test]
fn checked_in_schemas_and_graph_are_current() {
    let write = std::env::var("MEMBERSYNC_WRITE_SCHEMAS").is_ok_and(|v| v == "1");
    let dir = root().join("schemas");
    let mut stale = Vec::new();
    for (name, want) in membersync::schema::all() {
        let path = dir.join(name);
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have != want {
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &want).unwrap();
            } else {
                stale.push(name);
            }
        }
    }
    assert!(stale.is_empty(), "stale under schemas/: {stale:?}; run MEMBERSYNC_WRITE_SCHEMAS=1 cargo test");
}

#[test]
fn readme_draws_the_current_machine_graph() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mermaid = membersync::machine::graph::to_mermaid();
    assert!(
        readme.contains(&format!("```mermaid\n{mermaid}```")),
        "README's Mermaid diagram differs from the machine; paste schemas/membership.mmd into it"
    );
}
