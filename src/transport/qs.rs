//! Decodes a query string in `qs` bracket notation, as `@feathersjs/rest-client` writes it:
//! `name[$in][0]=a&name[$in][1]=b&$sort[age]=-1&$or[0][age][$lt]=30`. Every value stays a
//! string; the query layer converts by column type.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Deeper nesting than this is refused (qs itself stops at 5; Feathers queries need ~4).
const MAX_DEPTH: usize = 8;
/// A list index beyond this is refused rather than allocating a huge array.
const MAX_INDEX: usize = 1000;

enum Segment<'a> {
    Key(&'a str),
    Append,
}

/// Decodes a whole query string. Never panics, whatever the client sends.
pub fn decode(query: &str) -> Result<Value> {
    let mut root = Map::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let segments = split_key(&key)?;
        insert(&mut root, &segments, value.into_owned())?;
    }
    Ok(finish(Value::Object(root)))
}

fn split_key(key: &str) -> Result<Vec<Segment<'_>>> {
    let bad = || Error::bad_request(format!("invalid query parameter name '{key}'"));
    let (head, mut rest) = match key.find('[') {
        Some(i) => (&key[..i], &key[i..]),
        None => (key, ""),
    };
    if head.is_empty() {
        return Err(bad());
    }
    let mut segments = vec![Segment::Key(head)];
    while !rest.is_empty() {
        let inner_end = rest.find(']').ok_or_else(bad)?;
        if !rest.starts_with('[') {
            return Err(bad());
        }
        let inner = &rest[1..inner_end];
        segments.push(if inner.is_empty() {
            Segment::Append
        } else {
            Segment::Key(inner)
        });
        rest = &rest[inner_end + 1..];
        if segments.len() > MAX_DEPTH {
            return Err(Error::bad_request("query parameters are nested too deeply"));
        }
    }
    Ok(segments)
}

fn insert(map: &mut Map<String, Value>, path: &[Segment<'_>], value: String) -> Result<()> {
    let Some((first, rest)) = path.split_first() else {
        return Ok(());
    };
    let key = match first {
        Segment::Key(k) => {
            if let Ok(i) = k.parse::<usize>()
                && i > MAX_INDEX
            {
                return Err(Error::bad_request("query list index too large"));
            }
            (*k).to_owned()
        }
        Segment::Append => map.len().to_string(),
    };
    if rest.is_empty() {
        match map.get_mut(&key) {
            None => {
                map.insert(key, Value::String(value));
            }
            // `a=1&a=2` is a list, as in qs
            Some(Value::String(old)) => {
                let old = std::mem::take(old);
                let mut list = Map::new();
                list.insert("0".into(), Value::String(old));
                list.insert("1".into(), Value::String(value));
                map.insert(key, Value::Object(list));
            }
            Some(Value::Object(list)) if is_list(list) => {
                list.insert(list.len().to_string(), Value::String(value));
            }
            Some(_) => return Err(conflict(&key)),
        }
        return Ok(());
    }
    let child = map.entry(key.clone()).or_insert_with(|| Value::Object(Map::new()));
    match child {
        Value::Object(inner) => insert(inner, rest, value),
        _ => Err(conflict(&key)),
    }
}

fn conflict(key: &str) -> Error {
    Error::bad_request(format!(
        "query parameter '{key}' is given both as a value and as an object"
    ))
}

fn is_list(map: &Map<String, Value>) -> bool {
    !map.is_empty() && map.keys().all(|k| k.parse::<usize>().is_ok())
}

/// Turns objects whose keys are all indexes into arrays, in index order.
fn finish(value: Value) -> Value {
    match value {
        Value::Object(map) if is_list(&map) => {
            let mut items: Vec<(usize, Value)> = map
                .into_iter()
                .filter_map(|(k, v)| k.parse::<usize>().ok().map(|i| (i, finish(v))))
                .collect();
            items.sort_by_key(|(i, _)| *i);
            Value::Array(items.into_iter().map(|(_, v)| v).collect())
        }
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, finish(v))).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::decode;
    use serde_json::json;

    #[test]
    fn decodes_feathers_operators() {
        let q =
            decode("name[$in][0]=a&name[$in][1]=b&%24sort%5Bage%5D=-1&$or[0][age][$lt]=30&$limit=2").expect("valid");
        assert_eq!(
            q,
            json!({"name": {"$in": ["a", "b"]}, "$sort": {"age": "-1"},
                   "$or": [{"age": {"$lt": "30"}}], "$limit": "2"})
        );
    }

    #[test]
    fn append_brackets_and_repeated_keys_make_lists() {
        assert_eq!(
            decode("id[$in][]=1&id[$in][]=2").expect("valid"),
            json!({"id": {"$in": ["1", "2"]}})
        );
        assert_eq!(
            decode("$select=a&$select=b").expect("valid"),
            json!({"$select": ["a", "b"]})
        );
    }

    #[test]
    fn keeps_key_order_for_multi_column_sort() {
        let q = decode("$sort[name]=1&$sort[age]=-1").expect("valid");
        let keys: Vec<&String> = q["$sort"].as_object().expect("object").keys().collect();
        assert_eq!(keys, ["name", "age"]);
    }

    #[test]
    fn malformed_keys_and_conflicts_are_bad_requests() {
        for bad in ["a[b=1", "[x]=1", "a=1&a[b]=2", "a[99999]=1"] {
            assert_eq!(decode(bad).expect_err(bad).status(), 400, "{bad}");
        }
    }
}
