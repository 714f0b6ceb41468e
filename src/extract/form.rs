//! Form bodies (`application/x-www-form-urlencoded`, ThriveCart's): bracket keys
//! (`customer[email]`, `order[charges][0][amount]`, `purchase_map[]`) decoded into a tree.
//!
//! What this module must never do: accept a key nested deeper than `MAX_FORM_DEPTH` or a
//! body that is not UTF-8; both are errors.

use super::decode::{DecodeError, MAX_FORM_DEPTH};
use serde_json::{Map, Value};

/// Decodes a form body into a tree. Numeric bracket segments build arrays when they
/// count up from 0 (`a[0]`, `a[1]`), objects otherwise; `a[]` appends.
pub fn form(body: &[u8]) -> Result<Value, DecodeError> {
    if std::str::from_utf8(body).is_err() {
        return Err(DecodeError::Utf8);
    }
    let mut root = Value::Object(Map::new());
    for (key, value) in form_urlencoded::parse(body) {
        let segs = split_key(&key)?;
        insert(&mut root, &segs, Value::String(value.into_owned()));
    }
    Ok(normalize(root))
}

fn split_key(key: &str) -> Result<Vec<String>, DecodeError> {
    let (head, mut rest) = match key.find('[') {
        Some(i) => (&key[..i], &key[i..]),
        None => (key, ""),
    };
    if head.is_empty() {
        return Err(DecodeError::BadKey(super::time::brief_text(key)));
    }
    let mut segs = vec![head.to_string()];
    while !rest.is_empty() {
        if !rest.starts_with('[') {
            return Err(DecodeError::BadKey(super::time::brief_text(key)));
        }
        let close = rest.find(']').ok_or_else(|| DecodeError::BadKey(super::time::brief_text(key)))?;
        segs.push(rest[1..close].to_string());
        rest = &rest[close + 1..];
        if segs.len() > MAX_FORM_DEPTH {
            return Err(DecodeError::TooDeep(super::time::brief_text(key)));
        }
    }
    Ok(segs)
}

/// Inserts into objects only; `normalize` turns dense numeric-keyed objects into arrays.
fn insert(node: &mut Value, segs: &[String], value: Value) {
    let Value::Object(map) = node else {
        // `a=1&a[b]=2`: a scalar already sits where a branch must go; the later key wins.
        *node = Value::Object(Map::new());
        return insert(node, segs, value);
    };
    let mut seg = segs[0].clone();
    if seg.is_empty() {
        seg = map.len().to_string(); // `a[]` appends
    }
    if segs.len() == 1 {
        map.insert(seg, value);
        return;
    }
    let child = map.entry(seg).or_insert_with(|| Value::Object(Map::new()));
    insert(child, &segs[1..], value)
}

fn normalize(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let n = map.len();
            let dense = n > 0 && (0..n).all(|i| map.contains_key(&i.to_string()));
            if dense {
                let mut map = map;
                let items = (0..n).map(|i| normalize(map.remove(&i.to_string()).unwrap_or(Value::Null))).collect();
                Value::Array(items)
            } else {
                Value::Object(map.into_iter().map(|(k, v)| (k, normalize(v))).collect())
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn form_with_bracket_keys_decodes_to_tree() {
        let body = b"event=order.success&customer%5Bemail%5D=a%40b.c&order[charges][0][amount]=6900&order[charges][1][amount]=100&purchase_map[]=product-12&purchase_map[]=bump-3";
        let v = form(body).unwrap();
        assert_eq!(
            v,
            json!({
                "event": "order.success",
                "customer": {"email": "a@b.c"},
                "order": {"charges": [{"amount": "6900"}, {"amount": "100"}]},
                "purchase_map": ["product-12", "bump-3"]
            })
        );
    }

    #[test]
    fn form_with_sparse_numeric_keys_stays_an_object() {
        let v = form(b"subscriptions[product-12]=sub_1&ids[3]=x").unwrap();
        assert_eq!(v, json!({"subscriptions": {"product-12": "sub_1"}, "ids": {"3": "x"}}));
    }

    #[test]
    fn form_too_deep_or_malformed_is_an_error() {
        let deep = format!("a{}=1", "[x]".repeat(MAX_FORM_DEPTH + 1));
        assert!(matches!(form(deep.as_bytes()), Err(DecodeError::TooDeep(_))));
        assert!(matches!(form(b"[x]=1"), Err(DecodeError::BadKey(_))));
        assert!(matches!(form(b"a[x=1"), Err(DecodeError::BadKey(_))));
        assert_eq!(form(&[0xff, 0xfe]), Err(DecodeError::Utf8));
    }
}
