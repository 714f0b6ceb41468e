//! Compiling a provider file into an `Extractor`: every path parsed, every kind and
//! condition checked, the `reconcile:` section validated, every problem gathered with its
//! file:line:column.
//!
//! What this module must never do: stop at the first problem (the operator fixes them
//! all at once) or read a delivery.

use super::compiled::{Case, Cond, EventMap, Field, Fields, Idempotency, Target};
use super::path::Path;
use super::{decode, CompileError, Extractor};
use crate::canonical::EventKind;
use crate::diagnostic::Diagnostic;
use crate::spec::{self, Condition, FieldSpec, FieldsSpec, ProviderSpec, TimeUnit};
use std::collections::{BTreeMap, HashMap};

impl Extractor {
    /// Parses and compiles one provider file. `file` is used in diagnostics.
    pub fn load(file: &str, src: &str) -> Result<Extractor, CompileError> {
        let spec: ProviderSpec =
            crate::yaml::from_str(src).map_err(|e| CompileError(vec![Diagnostic::from_yaml(file, &e)]))?;
        Extractor::compile(file, src, spec)
    }

    /// Compiles a parsed provider spec, gathering every problem.
    pub fn compile(file: &str, src: &str, spec: ProviderSpec) -> Result<Extractor, CompileError> {
        let mut diags = Vec::new();
        let mut cx = Cx { file, src, diags: &mut diags, aliases: &spec.aliases };
        let idempotency = if spec.idempotency.body_hash {
            Idempotency::BodyHash
        } else if let Some(h) = &spec.idempotency.header {
            Idempotency::Header(h.paths().into_iter().map(|h| h.to_ascii_lowercase()).collect())
        } else if let Some(p) = &spec.idempotency.path {
            Idempotency::Paths(p.paths().into_iter().filter_map(|p| cx.path(p)).collect())
        } else {
            cx.err("idempotency", "`idempotency` needs one of `path`, `header`, `body_hash`");
            Idempotency::BodyHash
        };
        let event_id = spec.event_id.as_ref().map(|f| cx.field("event_id", f));
        let event_type = cx.field("event_type", &spec.event_type);
        let occurred_at = match &spec.occurred_at {
            Some(f) => cx.field("occurred_at", f),
            None => {
                if spec.occurred_at_fallback.is_none() {
                    cx.err("provider:", "`occurred_at` is required unless `occurred_at_fallback: received` is set");
                }
                Field { paths: vec![], constant: None, time: Some(TimeUnit::Auto), amount: None, map: BTreeMap::new() }
            }
        };
        if occurred_at.time.is_none() {
            cx.err("occurred_at", "`occurred_at` needs a `time:` unit (unix_seconds, unix_millis, iso8601, auto)");
        }
        let defaults = cx.fields(&spec.fields);
        let mut events = HashMap::new();
        for (name, ev) in &spec.events {
            let target = ev.kind.as_deref().map(|k| cx.target(k));
            let cases = ev
                .cases
                .iter()
                .enumerate()
                .map(|(i, c)| Case {
                    name: c.name.clone().unwrap_or_else(|| format!("cases[{i}]")),
                    conds: cx.conds(&c.when),
                    target: cx.target(&c.kind),
                    fields: cx.fields(&c.fields),
                })
                .collect();
            let fields = cx.fields(&ev.fields);
            let flags = ev.flags.iter().map(|f| (cx.conds(&f.when), f.flag.clone())).collect();
            events.insert(name.clone(), EventMap { target, cases, fields, flags });
        }
        if let Some(r) = &spec.reconcile {
            cx.reconcile(r);
        }
        let mut enrich = Vec::new();
        for e in &spec.enrich {
            let vars: Vec<(String, Path)> =
                e.vars.iter().filter_map(|(name, p)| cx.path(p).map(|p| (name.clone(), p))).collect();
            for name in placeholders(&e.url).into_iter().chain(e.headers.values().flat_map(|v| placeholders(v))) {
                if name != "api_base" && name != "api_key" && !e.vars.contains_key(name) {
                    cx.err(
                        &e.url,
                        &format!("enrich `{}`: `{{{name}}}` is neither api_base, api_key nor one of its vars", e.name),
                    );
                }
            }
            cx.path(&e.items);
            enrich.push(super::compiled::Enrich { conds: cx.conds(&e.when), vars });
        }
        let stem = std::path::Path::new(file).file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if !stem.is_empty() && stem != spec.provider {
            cx.err("provider:", &format!("`provider: {}` does not match the file name `{stem}`", spec.provider));
        }
        if !diags.is_empty() {
            return Err(CompileError(diags));
        }
        let mut x = Extractor {
            provider: spec.provider.clone(),
            decode: spec.decode,
            idempotency,
            event_id,
            event_type,
            occurred_at,
            defaults,
            events,
            enrich,
            spec,
            paths: decode::PathTree::default(),
        };
        let mut tree = decode::PathTree::default();
        for p in x.body_paths() {
            tree.add(p.steps());
            if let Some(alt) = p.alt() {
                tree.add(alt.steps());
            }
        }
        x.paths = tree;
        Ok(x)
    }

    /// Every path this extractor reads a body at.
    fn body_paths(&self) -> Vec<&Path> {
        fn of_fields(fields: &Fields) -> impl Iterator<Item = &Path> {
            fields.iter().flatten().flat_map(|f| f.paths.iter())
        }
        let mut out: Vec<&Path> = Vec::new();
        if let Idempotency::Paths(ps) = &self.idempotency {
            out.extend(ps);
        }
        for f in self.event_id.iter().chain([&self.event_type, &self.occurred_at]) {
            out.extend(&f.paths);
        }
        out.extend(of_fields(&self.defaults));
        for ev in self.events.values() {
            out.extend(of_fields(&ev.fields));
            for c in &ev.cases {
                out.extend(c.conds.iter().flat_map(|(p, c)| std::iter::once(p).chain(c.other_path())));
                out.extend(of_fields(&c.fields));
            }
            for (conds, _) in &ev.flags {
                out.extend(conds.iter().flat_map(|(p, c)| std::iter::once(p).chain(c.other_path())));
            }
        }
        for e in &self.enrich {
            out.extend(e.conds.iter().flat_map(|(p, c)| std::iter::once(p).chain(c.other_path())));
            out.extend(e.vars.iter().map(|(_, p)| p));
        }
        out
    }
}

/// Placeholders a reconcile template may use.
pub const TEMPLATE_VARS: [&str; 5] = ["api_base", "subscription_id", "customer_id", "product_id", "api_key"];

/// The `{name}` placeholders in a template.
pub fn placeholders(template: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        let Some(j) = rest[i..].find('}') else { break };
        out.push(&rest[i + 1..i + j]);
        rest = &rest[i + j + 1..];
    }
    out
}

fn compile_cond(c: &Condition, path: &mut impl FnMut(&str) -> Option<Path>) -> Vec<Cond> {
    match c {
        Condition::Equals(v) => vec![Cond::Equals(v.clone())],
        Condition::Test(t) => {
            let mut out = Vec::new();
            if let Some(v) = &t.equals {
                out.push(Cond::Equals(v.clone()));
            }
            if let Some(v) = &t.not_equals {
                out.push(Cond::NotEquals(v.clone()));
            }
            if let Some(v) = &t.one_of {
                out.push(Cond::OneOf(v.clone()));
            }
            if let Some(b) = t.present {
                out.push(Cond::Present(b));
            }
            if let Some(b) = t.is_null {
                out.push(Cond::Null(b));
            }
            if let Some(p) = t.same_as.as_deref().and_then(&mut *path) {
                out.push(Cond::SameAs(p));
            }
            if let Some(p) = t.differs_from.as_deref().and_then(&mut *path) {
                out.push(Cond::DiffersFrom(p));
            }
            if out.is_empty() && t.same_as.is_none() && t.differs_from.is_none() {
                out.push(Cond::Present(true));
            }
            out
        }
    }
}

/// Compile context: collects diagnostics with their location in the source.
struct Cx<'a> {
    file: &'a str,
    src: &'a str,
    diags: &'a mut Vec<Diagnostic>,
    aliases: &'a BTreeMap<String, String>,
}

impl Cx<'_> {
    fn err(&mut self, needle: &str, msg: &str) {
        let (line, col) = crate::diagnostic::locate(self.src, needle);
        self.diags.push(Diagnostic::new(self.file, line, col, msg));
    }

    fn path(&mut self, p: &str) -> Option<Path> {
        match Path::parse(p) {
            Ok(p) => Some(self.aliases.iter().fold(p, |p, (first, alias)| p.with_alias(first, alias))),
            Err(e) => {
                self.err(p, &e);
                None
            }
        }
    }

    /// The conditions of a `when:` map, each path parsed (a bad one reported).
    fn conds(&mut self, when: &BTreeMap<String, spec::Condition>) -> Vec<(Path, Cond)> {
        let mut out = Vec::new();
        for (p, cond) in when {
            if let Some(path) = self.path(p) {
                let conds = compile_cond(cond, &mut |other| self.path(other));
                out.extend(conds.into_iter().map(|c| (path.clone(), c)));
            }
        }
        out
    }

    fn target(&mut self, kind: &str) -> Target {
        if kind == "ignore" {
            return Target::Ignore;
        }
        match EventKind::parse(kind) {
            Some(k) => Target::Kind(k),
            None => {
                let (line, col) = crate::diagnostic::locate(self.src, &format!("kind: {kind}"));
                let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                let d = Diagnostic::new(self.file, line, col, format!("unknown canonical kind `{kind}`"));
                self.diags.push(d.suggest(kind, &names, true, &["ignore"]));
                Target::Ignore
            }
        }
    }

    fn field(&mut self, name: &str, spec: &FieldSpec) -> Field {
        let detail = spec.detail();
        if detail.paths.is_empty() && detail.constant.is_none() {
            self.err(name, &format!("field `{name}` needs `paths` or `const`"));
        }
        Field {
            paths: detail.paths.iter().filter_map(|p| self.path(p)).collect(),
            constant: detail.constant,
            time: detail.time,
            amount: detail.amount,
            map: detail.map,
        }
    }

    /// Checks a `reconcile:` section: paths, placeholders, a URL and a status.
    fn reconcile(&mut self, r: &spec::ReconcileSpec) {
        if r.unsupported.is_some() {
            return;
        }
        let Some(url) = &r.url else {
            self.err("reconcile:", "`reconcile:` needs a `url` (or `unsupported: <why>`)");
            return;
        };
        let mut templates: Vec<&str> = vec![url.as_str()];
        templates.extend(r.headers.values().map(String::as_str));
        let body = r.body.as_ref().map(|b| b.to_string()).unwrap_or_default();
        templates.push(&body);
        if let Some(sel) = &r.select {
            self.path(&sel.list);
            self.path(&sel.key);
            if let Some(e) = &sel.equals {
                templates.push(e);
            }
        }
        for t in templates {
            for name in placeholders(t) {
                // GraphQL bodies use braces of their own: only `{word}` placeholders count.
                let word = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if word && !TEMPLATE_VARS.contains(&name) {
                    self.err(
                        &format!("{{{name}}}"),
                        &format!("unknown placeholder `{{{name}}}`; one of {}", TEMPLATE_VARS.join(", ")),
                    );
                }
            }
        }
        if url.contains("{api_key}") {
            self.err("{api_key}", "`{api_key}` may appear only in headers: URLs are logged");
        }
        let f = &r.fields;
        match &f.status {
            Some(s) => {
                self.field("status", s);
            }
            None => self.err("reconcile:", "`reconcile.fields.status` is required"),
        }
        for (name, spec) in [
            ("period_end", &f.period_end),
            ("cancel_at_period_end", &f.cancel_at_period_end),
            ("product_id", &f.product_id),
        ] {
            if let Some(s) = spec {
                self.field(name, s);
            }
        }
    }

    fn fields(&mut self, spec: &FieldsSpec) -> Fields {
        let mut out: Fields = Default::default();
        for (i, (name, s)) in spec.in_order().into_iter().enumerate() {
            if let Some(s) = s {
                out[i] = Some(self.field(name, s));
            }
        }
        out
    }
}
