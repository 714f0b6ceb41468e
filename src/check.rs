//! `membersync check`: every problem in the operator's files at once, each as
//! `file:line:column: message` with a hint where one helps. The config and provider YAML
//! are validated against the JSON Schemas generated from the Rust types (the same ones
//! checked in under `schemas/`), then compiled; every rule file is compiled and linted
//! (machine inputs and states it names must exist). Paths that no fixture of the provider
//! ever resolves are notes, shown with `--verbose`.
//!
//! What this module must never do: change a file or open the database: it reads and
//! reports.

use crate::config::{Config, ConfigFile};
use crate::diagnostic::Diagnostic;
use crate::extract::path::Path as JsonPath;
use crate::machine::{Input, MState};
use crate::spec::{FieldSpec, FieldsSpec, ProviderSpec};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// What `check` found.
#[derive(Debug, Default)]
pub struct Findings {
    /// What refuses the files (`check` exits 1; a reload and `serve` refuse them).
    pub errors: Vec<Diagnostic>,
    /// What an operator should fix, though it refuses nothing (`--strict` makes them fail).
    pub warnings: Vec<Diagnostic>,
    /// What is only worth knowing when looking for it (`--verbose`): a provider file's paths
    /// that no fixture of the provider has — payload shapes the fixtures do not cover yet.
    pub notes: Vec<Diagnostic>,
}

impl Findings {
    /// One line per problem, errors first, then warnings (and notes, with `verbose`), then
    /// a summary line.
    pub fn render(&self, verbose: bool) -> String {
        let mut out = String::new();
        for d in &self.errors {
            out.push_str(&format!("{d}\n"));
        }
        let mut line = |d: &Diagnostic, what: &str| {
            out.push_str(&format!("{}:{}:{}: {what}: {}", d.file, d.line, d.column, d.message));
            if let Some(h) = &d.hint {
                out.push_str(&format!(" (hint: {h})"));
            }
            out.push('\n');
        };
        for d in &self.warnings {
            line(d, "warning");
        }
        if verbose {
            for d in &self.notes {
                line(d, "note");
            }
        }
        out.push_str(&format!("{} error(s), {} warning(s)", self.errors.len(), self.warnings.len()));
        if !self.notes.is_empty() {
            out.push_str(&format!(
                ", {} note(s){}",
                self.notes.len(),
                if verbose { "" } else { " (--verbose lists them)" }
            ));
        }
        out.push('\n');
        out
    }
}

/// Positions of every key and sequence item in a YAML text, by JSON pointer.
fn positions(src: &str) -> HashMap<String, (usize, usize)> {
    enum Frame {
        Map { path: String, key: Option<String> },
        Seq { path: String, idx: usize },
    }
    struct Rx {
        map: HashMap<String, (usize, usize)>,
        stack: Vec<Frame>,
    }
    fn esc(k: &str) -> String {
        k.replace('~', "~0").replace('/', "~1")
    }
    impl Rx {
        /// The pointer of a value starting here, recording its position; `None` for a key.
        fn value_path(&mut self, mark: Marker, scalar: Option<&str>) -> Option<String> {
            let at = (mark.line(), mark.col() + 1);
            match self.stack.last_mut() {
                None => Some(String::new()),
                Some(Frame::Map { path, key }) => match key.take() {
                    None => {
                        let k = scalar.unwrap_or_default().to_string();
                        self.map.insert(format!("{path}/{}", esc(&k)), at);
                        *key = Some(k);
                        None
                    }
                    Some(k) => Some(format!("{path}/{}", esc(&k))),
                },
                Some(Frame::Seq { path, idx }) => {
                    let p = format!("{path}/{idx}");
                    *idx += 1;
                    self.map.insert(p.clone(), at);
                    Some(p)
                }
            }
        }
    }
    impl MarkedEventReceiver for Rx {
        fn on_event(&mut self, ev: Event, mark: Marker) {
            match ev {
                Event::Scalar(v, ..) => {
                    self.value_path(mark, Some(&v));
                }
                Event::Alias(_) => {
                    self.value_path(mark, Some(""));
                }
                Event::MappingStart(..) => {
                    if let Some(path) = self.value_path(mark, None) {
                        self.stack.push(Frame::Map { path, key: None });
                    }
                }
                Event::SequenceStart(..) => {
                    if let Some(path) = self.value_path(mark, None) {
                        self.stack.push(Frame::Seq { path, idx: 0 });
                    }
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    self.stack.pop();
                }
                _ => {}
            }
        }
    }
    let mut rx = Rx { map: HashMap::new(), stack: Vec::new() };
    let _ = Parser::new_from_str(src).load(&mut rx, false);
    rx.map
}

fn locate(pos: &HashMap<String, (usize, usize)>, pointer: &str) -> (usize, usize) {
    let mut p = pointer.to_string();
    loop {
        if let Some(at) = pos.get(&p) {
            return *at;
        }
        match p.rfind('/') {
            Some(i) => p.truncate(i),
            None => return (1, 1),
        }
    }
}

fn property_names(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::Object(props)) = m.get("properties") {
                out.extend(props.keys().cloned());
            }
            for x in m.values() {
                property_names(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| property_names(x, out)),
        _ => {}
    }
}

/// Validates YAML text against a JSON Schema; every violation, located.
fn validate(file: &str, src: &str, schema: &serde_json::Value) -> Vec<Diagnostic> {
    let value: serde_json::Value = match crate::yaml::from_str::<serde_yaml::Value>(src) {
        Ok(v) => match serde_json::to_value(v) {
            Ok(j) => j,
            Err(e) => return vec![Diagnostic::new(file, 1, 1, e.to_string())],
        },
        Err(e) => return vec![Diagnostic::from_yaml(file, &e)],
    };
    let Ok(validator) = jsonschema::validator_for(schema) else { return vec![] };
    let pos = positions(src);
    let mut names = Vec::new();
    property_names(schema, &mut names);
    names.sort();
    names.dedup();
    let known: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for err in validator.iter_errors(&value) {
        let at = err.instance_path().to_string();
        if let jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } = err.kind() {
            for key in unexpected {
                let (line, col) = locate(&pos, &format!("{at}/{}", key.replace('~', "~0").replace('/', "~1")));
                let d = Diagnostic::new(file, line, col, format!("unknown key `{key}`"));
                out.push(d.suggest(key, &known, false, &[]));
            }
            continue;
        }
        let (line, col) = locate(&pos, &at);
        let place = if at.is_empty() { String::new() } else { format!("{at}: ") };
        out.push(Diagnostic::new(file, line, col, format!("{place}{err}")));
    }
    out
}

fn schema_of<T: schemars::JsonSchema>() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(T)).unwrap_or_default()
}

fn literals(src: &str, pattern: &str) -> Vec<(String, usize, usize)> {
    // `pattern` is the text before an opening quote, e.g. `input: `.
    let mut out = Vec::new();
    for (i, line) in src.lines().enumerate() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        let mut from = 0;
        while let Some(at) = line[from..].find(pattern) {
            let start = from + at + pattern.len();
            let rest = &line[start..];
            if let Some(stripped) = rest.strip_prefix('"') {
                if let Some(end) = stripped.find('"') {
                    out.push((stripped[..end].to_string(), i + 1, start + 2));
                }
            }
            from = start;
        }
    }
    out
}

/// Rule files name machine inputs and states as strings; each must exist.
fn lint_rules(dir: &Path, shown: &str) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let inputs: Vec<&str> = Input::ALL.iter().map(|i| i.as_str()).collect();
    let states: Vec<&str> = MState::ALL.iter().map(|s| s.as_str()).collect();
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|x| x == "rhai"));
    files.sort();
    for p in files {
        let Ok(src) = std::fs::read_to_string(&p) else { continue };
        let name = format!("{shown}/{}", p.file_name().unwrap_or_default().to_string_lossy());
        for (v, line, col) in literals(&src, "input: ") {
            if !inputs.contains(&v.as_str()) {
                let d = Diagnostic::new(&name, line, col, format!("the machine has no input `{v}`"));
                out.push(d.suggest(&v, &inputs, true, &[]));
            }
        }
        for pat in ["m.state == ", "m.state != "] {
            for (v, line, col) in literals(&src, pat) {
                if !states.contains(&v.as_str()) {
                    let d = Diagnostic::new(&name, line, col, format!("the machine has no state `{v}`"));
                    out.push(d.suggest(&v, &states, true, &[]));
                }
            }
        }
    }
    out
}

fn field_paths(f: &Option<FieldSpec>, out: &mut Vec<String>) {
    if let Some(f) = f {
        out.extend(f.detail().paths);
    }
}

fn fields_paths(f: &FieldsSpec, out: &mut Vec<String>) {
    for (_, x) in f.in_order() {
        field_paths(x, out);
    }
}

/// Where `token` stands as a whole word outside comments (first such place).
fn locate_token(src: &str, token: &str) -> (usize, usize) {
    let word = |c: char| c.is_alphanumeric() || c == '.' || c == '_' || c == '[' || c == ']';
    for (i, line) in src.lines().enumerate() {
        let code = line.split(" #").next().unwrap_or(line);
        if code.trim_start().starts_with('#') {
            continue;
        }
        let mut from = 0;
        while let Some(at) = code[from..].find(token) {
            let start = from + at;
            let before = code[..start].chars().next_back();
            let after = code[start + token.len()..].chars().next();
            if !before.is_some_and(word) && !after.is_some_and(|c| word(c) || c == ':') {
                return (i + 1, start + 1);
            }
            from = start + token.len();
        }
    }
    crate::diagnostic::locate(src, token)
}

/// Paths in a provider file that no fixture of that provider resolves (likely typos).
fn unresolved_paths(file: &str, src: &str, spec: &ProviderSpec, fixtures: &Path) -> Vec<Diagnostic> {
    let Ok(entries) = std::fs::read_dir(fixtures) else { return vec![] };
    let x = match crate::extract::Extractor::compile(file, src, spec.clone()) {
        Ok(x) => x,
        Err(_) => return vec![],
    };
    let mut bodies = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let p = e.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy().to_string();
        let ct = if name.ends_with(".form") {
            "application/x-www-form-urlencoded"
        } else if name.ends_with(".json") && !name.ends_with(".headers.json") {
            "application/json"
        } else {
            continue;
        };
        if let Ok(raw) = std::fs::read(&p) {
            if let Ok(v) = x.decode(&raw, Some(ct)) {
                bodies.push(v);
            }
        }
    }
    if bodies.is_empty() {
        return vec![];
    }
    let mut paths = Vec::new();
    field_paths(&spec.event_id, &mut paths);
    field_paths(&Some(spec.event_type.clone()), &mut paths);
    field_paths(&spec.occurred_at, &mut paths);
    fields_paths(&spec.fields, &mut paths);
    for ev in spec.events.values() {
        fields_paths(&ev.fields, &mut paths);
        for c in &ev.cases {
            fields_paths(&c.fields, &mut paths);
            paths.extend(c.when.keys().cloned());
        }
        for f in &ev.flags {
            paths.extend(f.when.keys().cloned());
        }
    }
    paths.sort();
    paths.dedup();
    let mut out = Vec::new();
    for p in paths {
        let Ok(path) = JsonPath::parse(&p) else { continue };
        if !bodies.iter().any(|b| path.lookup(b).is_some()) {
            let (line, col) = locate_token(src, &p);
            out.push(
                Diagnostic::new(file, line, col, format!("no fixture in {} has `{p}`", fixtures.display()))
                    .with_hint("a typo, or a payload shape no fixture covers yet"),
            );
        }
    }
    out
}

/// Checks the config at `config_path`, every provider file and every rule file.
pub fn check(config_path: &Path) -> Findings {
    let mut f = Findings::default();
    let shown = config_path.file_name().unwrap_or_default().to_string_lossy().to_string();
    let src = match std::fs::read_to_string(config_path) {
        Ok(s) => s,
        Err(e) => {
            f.errors.push(Diagnostic::new(&shown, 1, 1, format!("cannot read: {e}")));
            return f;
        }
    };
    let base = config_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let config_errors = validate(&shown, &src, &schema_of::<ConfigFile>());
    let parsed: Option<ConfigFile> = crate::yaml::from_str(&src).ok();
    let rules_dir = base.join(parsed.as_ref().and_then(|c| c.rules_dir.clone()).unwrap_or_else(|| "rules".into()));
    f.errors.extend(config_errors.iter().cloned());

    // Provider files: schema first; compile only those that pass (to avoid one mistake twice).
    let provider_schema = schema_of::<ProviderSpec>();
    let mut provider_files: Vec<PathBuf> = std::fs::read_dir(rules_dir.join("providers"))
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    provider_files.retain(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"));
    provider_files.sort();
    let mut schema_broken = Vec::new();
    for p in &provider_files {
        let file = format!("rules/providers/{}", p.file_name().unwrap_or_default().to_string_lossy());
        let psrc = match std::fs::read_to_string(p) {
            Ok(s) => s,
            Err(e) => {
                schema_broken.push(file.clone());
                f.errors.push(Diagnostic::new(&file, 1, 1, format!("cannot read: {e}")));
                continue;
            }
        };
        let errs = validate(&file, &psrc, &provider_schema);
        if !errs.is_empty() {
            schema_broken.push(file.clone());
            f.errors.extend(errs);
            continue;
        }
        match crate::yaml::from_str::<ProviderSpec>(&psrc) {
            Ok(spec) => {
                if let Err(e) = crate::extract::Extractor::compile(&file, &psrc, spec.clone()) {
                    schema_broken.push(file.clone());
                    f.errors.extend(e.0);
                    continue;
                }
                let fixtures = base.join("tests/fixtures").join(&spec.provider);
                f.notes.extend(unresolved_paths(&file, &psrc, &spec, &fixtures));
            }
            Err(e) => {
                schema_broken.push(file.clone());
                f.errors.push(Diagnostic::from_yaml(&file, &e));
            }
        }
    }
    // Semantic compile (unknown kinds, bad paths, providers a tenant names but lacks).
    if config_errors.is_empty() {
        if let Err(e) = Config::load(config_path) {
            for d in e.0 {
                // Provider files were reported above, each once.
                let dup = d.file.starts_with("rules/providers/")
                    || (d.message.contains("which has no valid") && !schema_broken.is_empty());
                if !dup {
                    let mut d = d;
                    if d.file == config_path.display().to_string() {
                        d.file = shown.clone();
                    }
                    f.errors.push(d);
                }
            }
        }
    }
    if let Err(e) = crate::rules::RuleSet::load(&rules_dir, "rules", chrono::Utc::now()) {
        f.errors.extend(e.0);
    }
    f.errors.extend(lint_rules(&rules_dir, "rules"));
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_point_at_keys_and_items() {
        let src = "a:\n  b: 1\n  list:\n    - x\n    - {c: 2}\n";
        let p = positions(src);
        assert_eq!(p["/a"], (1, 1));
        assert_eq!(p["/a/b"], (2, 3));
        assert_eq!(p["/a/list/1"], (5, 7));
        assert_eq!(p["/a/list/1/c"], (5, 8));
    }
}
