//! Paths into a decoded body: `data.object.items.data[0].price.id` (or `data.0`).
//! A path tells "absent" from "present and null", which conditions need.
//!
//! What this module must never do: guess at a missing key: absent stays absent.

use serde_json::Value;

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seg {
    key: String,
    index: Option<usize>,
}

/// A compiled path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    text: String,
    segs: Vec<Seg>,
    /// The same path under an aliased top-level key, read when this one's key is absent.
    alt: Option<Box<Path>>,
}

impl Path {
    /// Compiles a path; errors name what is wrong with it.
    pub fn parse(text: &str) -> Result<Path, String> {
        if text.trim().is_empty() {
            return Err("empty path".into());
        }
        let mut segs = Vec::new();
        for part in text.split('.') {
            if part.is_empty() {
                return Err(format!("path `{text}` has an empty segment"));
            }
            // `name[0][1]` → name, 0, 1
            let (head, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if !head.is_empty() {
                segs.push(Seg { key: head.to_string(), index: head.parse().ok() });
            }
            while !rest.is_empty() {
                let close = rest.find(']').ok_or_else(|| format!("path `{text}` has an unclosed `[`"))?;
                let idx = &rest[1..close];
                let n: usize = idx.parse().map_err(|_| format!("path `{text}`: `[{idx}]` is not an index"))?;
                segs.push(Seg { key: idx.to_string(), index: Some(n) });
                rest = &rest[close + 1..];
                if !rest.is_empty() && !rest.starts_with('[') {
                    return Err(format!("path `{text}`: unexpected `{rest}`"));
                }
            }
        }
        Ok(Path { text: text.to_string(), segs, alt: None })
    }

    /// This path, also read at `alias.…` when its first key is absent (`aliases:` in the
    /// provider file).
    pub fn with_alias(mut self, first: &str, alias: &str) -> Path {
        if self.segs.first().is_some_and(|s| s.key == first) {
            let mut alt = self.clone();
            alt.segs[0] = Seg { key: alias.to_string(), index: alias.parse().ok() };
            alt.text = format!("{alias}{}", &self.text[first.len()..]);
            self.alt = Some(Box::new(alt));
        }
        self
    }

    /// The aliased path read in this one's place, if any.
    pub fn alt(&self) -> Option<&Path> {
        self.alt.as_deref()
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Each step as (object key, array index if the step is a number).
    pub(crate) fn steps(&self) -> impl Iterator<Item = (&str, Option<usize>)> {
        self.segs.iter().map(|s| (s.key.as_str(), s.index))
    }

    /// The value at this path: `None` when a key is absent, `Some(Null)` when present and null.
    pub fn lookup<'a>(&self, root: &'a Value) -> Option<&'a Value> {
        match (self.lookup_from(0, root), &self.alt) {
            (None, Some(alt)) if self.first_absent(root) => alt.lookup(root),
            (v, _) => v,
        }
    }

    /// Whether the body has no value at this path's first key (so an alias may stand in).
    fn first_absent(&self, root: &Value) -> bool {
        self.segs.first().is_none_or(|s| root.get(&s.key).is_none())
    }

    /// The value at this path's steps from `start` on, read in `v`.
    pub(crate) fn lookup_from<'a>(&self, start: usize, v: &'a Value) -> Option<&'a Value> {
        let mut cur = v;
        for seg in self.segs.get(start..)? {
            cur = match cur {
                Value::Object(map) => map.get(&seg.key)?,
                Value::Array(items) => items.get(seg.index?)?,
                _ => return None,
            };
        }
        Some(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn path_reads_nested_keys_and_indexes() {
        let v = json!({"data": {"items": [{"id": "a"}, {"id": "b"}], "n": null}});
        assert_eq!(Path::parse("data.items[1].id").unwrap().lookup(&v), Some(&json!("b")));
        assert_eq!(Path::parse("data.items.0.id").unwrap().lookup(&v), Some(&json!("a")));
        assert_eq!(Path::parse("data.n").unwrap().lookup(&v), Some(&Value::Null));
        assert_eq!(Path::parse("data.missing").unwrap().lookup(&v), None);
        assert_eq!(Path::parse("data.items[5].id").unwrap().lookup(&v), None);
    }

    #[test]
    fn path_with_bad_syntax_is_an_error() {
        assert!(Path::parse("a..b").is_err());
        assert!(Path::parse("a[x]").is_err());
        assert!(Path::parse("a[0").is_err());
        assert!(Path::parse("").is_err());
    }
}
