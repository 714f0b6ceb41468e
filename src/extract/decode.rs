//! Body decoding: JSON, or `application/x-www-form-urlencoded` with PHP bracket keys
//! (`customer[email]`, `order[charges][0][amount]`) decoded into the same tree a JSON
//! provider would send, so paths read alike. Never panics on any input.

use super::path::Path;
use serde_json::{Map, Value};

/// Deepest nesting accepted in a form key (JSON depth is bounded by serde_json's limit).
pub const MAX_FORM_DEPTH: usize = 32;

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The body is not valid JSON (400).
    #[error("body is not valid JSON: {0}")]
    Json(String),
    /// The body is not UTF-8 (400).
    #[error("body is not valid UTF-8")]
    Utf8,
    /// A form key nests deeper than the limit (400).
    #[error("form key `{0}` nests deeper than {MAX_FORM_DEPTH} levels")]
    TooDeep(String),
    /// A form key is malformed (400).
    #[error("form key `{0}` is malformed")]
    BadKey(String),
    /// The JSON body is not an object (400).
    #[error("body must be a JSON object")]
    NotObject,
}

/// Decodes a JSON body; the top level must be an object.
pub fn json(body: &[u8]) -> Result<Value, DecodeError> {
    if std::str::from_utf8(body).is_err() {
        return Err(DecodeError::Utf8);
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?;
    if !v.is_object() {
        return Err(DecodeError::NotObject);
    }
    Ok(v)
}

/// The parts of a body an extractor reads: every configured path, as a tree. Decoding
/// builds only these parts (and what lies under a path's end), skipping the rest of the
/// body without building it, though still checking that all of it is valid JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathTree {
    /// A path ends here: keep the whole value.
    whole: bool,
    /// Where a path ending here keeps its value in a [`Captured`] decode.
    slot: Option<usize>,
    /// (Root only) how many nodes have a slot.
    slots: usize,
    /// The steps below this node. A handful at most: a list scanned in order is faster
    /// to look a key up in than a hash map.
    keys: Vec<(String, PathTree)>,
    /// The highest array index any path steps through here.
    max_index: Option<usize>,
}

impl PathTree {
    /// Adds one path, as its steps (object key, array index if numeric).
    pub fn add<'a>(&mut self, steps: impl IntoIterator<Item = (&'a str, Option<usize>)>) {
        let next = self.slots;
        let mut node = &mut *self;
        for (key, index) in steps {
            if let Some(i) = index {
                node.max_index = Some(node.max_index.map_or(i, |m| m.max(i)));
            }
            let at = match node.keys.iter().position(|(k, _)| k == key) {
                Some(at) => at,
                None => {
                    node.keys.push((key.to_string(), PathTree::default()));
                    node.keys.len() - 1
                }
            };
            node = &mut node.keys[at].1;
        }
        node.whole = true;
        if node.slot.is_none() {
            node.slot = Some(next);
            self.slots += 1;
        }
    }

    fn child(&self, key: &str) -> Option<&PathTree> {
        self.keys.iter().find(|(k, _)| k == key).map(|(_, t)| t)
    }

    /// The child under `key`, with its place among this node's children.
    fn child_at(&self, key: &str) -> Option<(usize, &PathTree)> {
        self.keys.iter().position(|(k, _)| k == key).map(|i| (i, &self.keys[i].1))
    }
}

/// Reading a path in a decoded body: in a whole [`Value`], or in what a [`Captured`]
/// decode kept. Both give the same answer for every path of the extractor's tree.
pub trait Lookup {
    /// The value at `path`: `None` when absent, `Some(Null)` when present and null.
    fn at(&self, path: &Path) -> Option<&Value>;
}

impl Lookup for Value {
    fn at(&self, path: &Path) -> Option<&Value> {
        path.lookup(self)
    }
}

/// A JSON body decoded into only the values its paths end at, one slot per path end, with
/// no tree of objects built around them (the tree is the extractor's [`PathTree`]).
#[derive(Debug)]
pub struct Captured<'t> {
    tree: &'t PathTree,
    slots: Vec<Option<Value>>,
}

impl Lookup for Captured<'_> {
    fn at(&self, path: &Path) -> Option<&Value> {
        match (self.at_exactly(path), path.alt()) {
            (None, Some(alt)) if self.tree.child(path.steps().next()?.0).is_none_or(|n| !self.holds_any(n)) => {
                self.at_exactly(alt)
            }
            (v, _) => v,
        }
    }
}

impl Captured<'_> {
    /// Whether any value was captured at or below `node`.
    fn holds_any(&self, node: &PathTree) -> bool {
        node.slot.is_some_and(|s| self.slots[s].is_some()) || node.keys.iter().any(|(_, c)| self.holds_any(c))
    }

    fn at_exactly(&self, path: &Path) -> Option<&Value> {
        let mut node = self.tree;
        for (i, (key, _)) in path.steps().enumerate() {
            node = node.child(key)?;
            if let Some(slot) = node.slot {
                // The first path end on the way holds the whole value below it.
                return path.lookup_from(i + 1, self.slots[slot].as_ref()?);
            }
        }
        None
    }
}

/// A body as the extract stage reads it.
#[derive(Debug)]
pub enum Decoded<'t> {
    /// JSON, as the values at the configured paths.
    Captured(Captured<'t>),
    /// A form body, or JSON whose object repeats a key the paths go through (the last
    /// occurrence wins, as in a whole decode): a tree.
    Tree(Value),
}

impl Lookup for Decoded<'_> {
    fn at(&self, path: &Path) -> Option<&Value> {
        match self {
            Decoded::Captured(c) => c.at(path),
            Decoded::Tree(v) => v.at(path),
        }
    }
}

/// Decodes a JSON body keeping only the values `tree`'s paths end at; the top level must
/// be an object. Every path of the tree reads the same as in `json_paths` (and `json`),
/// and a body is refused exactly when `json` refuses it.
pub fn json_captured<'t>(body: &[u8], tree: &'t PathTree) -> Result<Decoded<'t>, DecodeError> {
    let Ok(text) = std::str::from_utf8(body) else {
        return Err(DecodeError::Utf8);
    };
    let mut slots = vec![None; tree.slots];
    let repeated = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_str(text);
    let seed = Capture { node: tree, slots: &mut slots, repeated: &repeated };
    match serde::de::DeserializeSeed::deserialize(seed, &mut de).and_then(|object| de.end().map(|()| object)) {
        Ok(true) => Ok(Decoded::Captured(Captured { tree, slots })),
        Ok(false) => Err(DecodeError::NotObject),
        // A key repeated along a path: decoded again as a tree, where the last one wins.
        Err(_) if repeated.get() => json_paths(body, tree).map(Decoded::Tree),
        Err(e) => Err(DecodeError::Json(e.to_string())),
    }
}

/// Decodes one node of the body under a non-final node of the path tree, into the slots
/// of the path ends below it. Returns whether the node was an object.
struct Capture<'t, 's> {
    node: &'t PathTree,
    slots: &'s mut Vec<Option<Value>>,
    repeated: &'s std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Capture<'_, '_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl Capture<'_, '_> {
    /// Decodes the value under `child` of this node.
    fn next<'de, A: serde::de::MapAccess<'de>>(&mut self, child: &PathTree, map: &mut A) -> Result<(), A::Error> {
        match child.slot {
            Some(slot) => self.slots[slot] = Some(map.next_value()?),
            None => {
                map.next_value_seed(Capture { node: child, slots: self.slots, repeated: self.repeated })?;
            }
        }
        Ok(())
    }
}

impl<'de> serde::de::Visitor<'de> for Capture<'_, '_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_str<E>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_none<E>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<bool, A::Error> {
        // Children already gone through: a second occurrence of a key whose subtree has
        // been captured would mix two objects, where a whole decode keeps only the last.
        let mut seen = 0u64;
        while let Some(key) = map.next_key_seed(Key)? {
            match self.node.child_at(key.as_ref()) {
                // A path ends here: the last occurrence wins, as in a whole decode.
                Some((_, child)) if child.slot.is_some() => self.next(child, &mut map)?,
                Some((i, child)) => {
                    let bit = 1u64.checked_shl(i as u32).unwrap_or(0);
                    if bit == 0 || seen & bit != 0 {
                        self.repeated.set(true);
                        return Err(serde::de::Error::custom("a key on a configured path is repeated"));
                    }
                    seen |= bit;
                    self.next(child, &mut map)?;
                }
                None => map.next_value_seed(Skip)?,
            }
        }
        Ok(true)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let mut i = 0usize;
        let mut digits = itoa::Buffer::new();
        loop {
            let child = match self.node.max_index {
                Some(max) if i <= max => self.node.child(digits.format(i)),
                _ => None,
            };
            let more = match child {
                Some(child) => match child.slot {
                    Some(slot) => match seq.next_element::<Value>()? {
                        Some(v) => {
                            self.slots[slot] = Some(v);
                            true
                        }
                        None => false,
                    },
                    None => seq
                        .next_element_seed(Capture { node: child, slots: self.slots, repeated: self.repeated })?
                        .is_some(),
                },
                None => seq.next_element_seed(Skip)?.is_some(),
            };
            if !more {
                return Ok(false);
            }
            i += 1;
        }
    }
}

/// Decodes a JSON body building only the parts `tree` names; the top level must be an
/// object. Looking any path of the tree up in the result gives what it gives in the full
/// decode (`json`), and a body is refused exactly when `json` refuses it.
pub fn json_paths(body: &[u8], tree: &PathTree) -> Result<Value, DecodeError> {
    let Ok(text) = std::str::from_utf8(body) else {
        return Err(DecodeError::Utf8);
    };
    // From the checked text, so strings are not checked for UTF-8 a second time.
    let mut de = serde_json::Deserializer::from_str(text);
    let v = serde::de::DeserializeSeed::deserialize(Pruned(tree), &mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| DecodeError::Json(e.to_string()))?;
    if !v.is_object() {
        return Err(DecodeError::NotObject);
    }
    Ok(v)
}

/// Deserializes one node of the body under a node of the path tree.
struct Pruned<'t>(&'t PathTree);

impl<'de> serde::de::DeserializeSeed<'de> for Pruned<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        if self.0.whole || self.0.keys.is_empty() {
            return serde::Deserialize::deserialize(d);
        }
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Pruned<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        serde::de::DeserializeSeed::deserialize(self, d)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key_seed(Key)? {
            match self.0.child(key.as_ref()) {
                Some(child) => {
                    let v = map.next_value_seed(Pruned(child))?;
                    out.insert(key.into_owned(), v);
                }
                None => {
                    map.next_value_seed(Skip)?;
                }
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        // Items up to the highest index a path names are kept (unnamed ones as null, so
        // indexes stay where they were); the rest are checked and skipped.
        let mut out = Vec::new();
        let mut i = 0usize;
        let mut digits = itoa::Buffer::new();
        loop {
            let child = match self.0.max_index {
                Some(max) if i <= max => self.0.child(digits.format(i)),
                _ => None,
            };
            match child {
                Some(child) => match seq.next_element_seed(Pruned(child))? {
                    Some(v) => out.push(v),
                    None => break,
                },
                None => match seq.next_element_seed(Skip)? {
                    Some(_) if self.0.max_index.is_some_and(|max| i <= max) => out.push(Value::Null),
                    Some(_) => {}
                    None => break,
                },
            }
            i += 1;
        }
        Ok(Value::Array(out))
    }
}

/// A part of the body no path reads: checked and dropped, building nothing. It goes
/// through the same nesting count as the full decode, so a body nested too deeply is
/// refused wherever the nesting is.
struct Skip;

impl<'de> serde::de::DeserializeSeed<'de> for Skip {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Skip {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Skip)?.is_some() {
            map.next_value_seed(Skip)?;
        }
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Skip)?.is_some() {}
        Ok(())
    }
}

/// An object key, borrowed from the body when it has no escapes.
struct Key;

impl<'de> serde::de::DeserializeSeed<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_steps_are_looked_up_by_their_decimal_index() {
        let mut buf = itoa::Buffer::new();
        for i in [0usize, 7, 10, 123, 4096, usize::MAX] {
            assert_eq!(buf.format(i), i.to_string());
        }
        let mut tree = PathTree::default();
        tree.add([("lines", None), ("data", None), ("12", Some(12)), ("id", None)]);
        let items: Vec<String> = (0..14).map(|i| format!(r#"{{"id":"it_{i}","x":[1,2]}}"#)).collect();
        let body = format!(r#"{{"lines":{{"data":[{}]}},"other":{{"a":1}}}}"#, items.join(","));
        let v = json_paths(body.as_bytes(), &tree).unwrap();
        assert_eq!(v.pointer("/lines/data/12/id"), Some(&Value::from("it_12")));
        assert_eq!(v.pointer("/lines/data/3"), Some(&Value::Null), "unnamed items up to the index stay as null");
        assert_eq!(v.pointer("/lines/data/13"), None, "items past the highest index are skipped");
        assert_eq!(v.get("other"), None);
    }

    #[test]
    fn json_must_be_an_object() {
        assert_eq!(json(b"[1]"), Err(DecodeError::NotObject));
        assert!(matches!(json(b"{"), Err(DecodeError::Json(_))));
        assert!(json(br#"{"a":1}"#).is_ok());
    }
}
