//! The small subset of JSONPath that CRDs use in `additionalPrinterColumns` and scale paths.
//!
//! Supported: dotted fields (`.spec.replicas`), array indexes (`.items[0]`), and equality
//! filters on array elements (`.status.conditions[?(@.type=="Ready")].status`). A filter that
//! selects several elements yields the first, which is what printer columns display.

use serde_json::Value;

#[derive(Debug, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    Filter { field: String, value: String },
}

fn parse(path: &str) -> Option<Vec<Step>> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let mut steps = Vec::new();
    let mut rest = path.strip_prefix('$').unwrap_or(path);
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            if end > 0 {
                steps.push(Step::Field(r[..end].to_string()));
            }
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inner = r[..end].trim();
            if let Some(filter) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (field, value) = filter.split_once("==")?;
                let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
                steps.push(Step::Filter {
                    field: field.trim().to_string(),
                    value: value.to_string(),
                });
            } else if let Some(quoted) = inner.strip_prefix('\'').and_then(|q| q.strip_suffix('\'')) {
                steps.push(Step::Field(quoted.to_string()));
            } else {
                steps.push(Step::Index(inner.parse().ok()?));
            }
            rest = &r[end + 1..];
        } else {
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            steps.push(Step::Field(rest[..end].to_string()));
            rest = &rest[end..];
        }
    }
    Some(steps)
}

/// The value at `path` in `object`, if every step exists.
pub fn get<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let mut current = object;
    for step in parse(path)? {
        current = match step {
            Step::Field(f) => current.get(&f)?,
            Step::Index(i) => current.get(i)?,
            Step::Filter { field, value } => current.as_array()?.iter().find(|item| match item.get(&field) {
                Some(Value::String(s)) => *s == value,
                Some(other) => display(other) == value,
                None => false,
            })?,
        };
    }
    Some(current)
}

/// Sets the value at a dotted field `path`, creating intermediate objects.
///
/// Returns false when the path is not a plain field path or crosses a non-object.
pub fn set(object: &mut Value, path: &str, value: Value) -> bool {
    let Some(steps) = parse(path) else {
        return false;
    };
    let mut current = object;
    for (i, step) in steps.iter().enumerate() {
        let Step::Field(field) = step else {
            return false;
        };
        if current.is_null() {
            *current = Value::Object(Default::default());
        }
        let Some(map) = current.as_object_mut() else {
            return false;
        };
        if i + 1 == steps.len() {
            map.insert(field.clone(), value);
            return true;
        }
        current = map.entry(field.clone()).or_insert(Value::Null);
    }
    false
}

/// Renders a value the way kubectl shows it in a table cell.
pub fn display(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_fields_indexes_and_filters() {
        let obj = json!({"spec": {"replicas": 3}, "status": {"conditions": [
            {"type": "Progressing", "status": "False"}, {"type": "Available", "status": "True"}]}});
        assert_eq!(get(&obj, ".spec.replicas"), Some(&json!(3)));
        assert_eq!(get(&obj, ".status.conditions[1].type"), Some(&json!("Available")));
        assert_eq!(
            get(&obj, ".status.conditions[?(@.type==\"Available\")].status"),
            Some(&json!("True"))
        );
        assert_eq!(get(&obj, ".status.missing"), None);
    }

    #[test]
    fn sets_nested_fields() {
        let mut obj = json!({"metadata": {"name": "a"}});
        assert!(set(&mut obj, ".spec.replicas", json!(5)));
        assert_eq!(obj["spec"]["replicas"], json!(5));
    }
}
