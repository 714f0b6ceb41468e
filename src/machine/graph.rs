//! The machine's graph, read off the statig machine itself by stepping every input from
//! every state. Exported to `schemas/membership.graph.json` and drawn as Mermaid in the
//! README; a test fails when either is stale (`MEMBERSYNC_WRITE_SCHEMAS=1` rewrites).
//!
//! What this module must never do: describe an edge the machine does not have: the graph is
//! read off the machine, not written by hand.

use super::{statig_step as step, Input, MState, Step};
use serde::Serialize;

/// One allowed edge.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Edge {
    pub from: MState,
    pub input: Input,
    pub to: MState,
}

/// One state with its access meaning.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StateInfo {
    pub name: MState,
    pub holds_access: bool,
    pub end: bool,
}

/// The whole graph.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Graph {
    pub initial: MState,
    pub states: Vec<StateInfo>,
    pub inputs: Vec<Input>,
    pub edges: Vec<Edge>,
}

/// Reads the graph off the machine.
pub fn graph() -> Graph {
    let mut edges = Vec::new();
    for from in MState::ALL {
        for input in Input::ALL {
            if let Step::Moved { to, .. } = step(from, input) {
                edges.push(Edge { from, input, to });
            }
        }
    }
    Graph {
        initial: MState::None,
        states: MState::ALL
            .into_iter()
            .map(|s| StateInfo { name: s, holds_access: s.holds_access(), end: s.is_end() })
            .collect(),
        inputs: Input::ALL.to_vec(),
        edges,
    }
}

/// The graph as pretty JSON (what `schemas/membership.graph.json` holds).
pub fn to_json() -> String {
    serde_json::to_string_pretty(&graph()).expect("graph serializes") + "\n"
}

/// The graph as a Mermaid state diagram; self-loops are listed, edges with the same ends
/// are merged into one arrow.
pub fn to_mermaid() -> String {
    let g = graph();
    let mut out = String::from("stateDiagram-v2\n    [*] --> none\n");
    let mut merged: Vec<(MState, MState, Vec<&str>)> = Vec::new();
    for e in &g.edges {
        match merged.iter_mut().find(|(f, t, _)| *f == e.from && *t == e.to) {
            Some((_, _, names)) => names.push(e.input.as_str()),
            None => merged.push((e.from, e.to, vec![e.input.as_str()])),
        }
    }
    for (from, to, names) in merged {
        out.push_str(&format!("    {from} --> {to}: {}\n", names.join(", ")));
    }
    for s in g.states.iter().filter(|s| s.holds_access) {
        out.push_str(&format!("    class {} access\n", s.name));
    }
    out.push_str("    classDef access fill:#d4f7d4,stroke:#2a7a2a\n");
    out
}
