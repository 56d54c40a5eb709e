//! Label and field selectors, as sent in `labelSelector` and `fieldSelector` query parameters
//! and as written in `LabelSelector` objects (`matchLabels`, `matchExpressions`).

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::jsonpath;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Operator {
    Equals,
    NotEquals,
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    operator: Operator,
    values: Vec<String>,
}

impl Requirement {
    fn matches(&self, value: Option<&str>) -> bool {
        match self.operator {
            Operator::Equals | Operator::In => value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Operator::NotEquals | Operator::NotIn => !value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

fn split_terms(s: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms.into_iter().map(str::trim).filter(|t| !t.is_empty()).collect()
}

fn parse_set(values: &str) -> Result<Vec<String>, ApiError> {
    let inner = values
        .trim()
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(|| ApiError::bad_request(format!("invalid set in selector: {values:?}")))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    /// Parses the `labelSelector` query syntax: `a=b`, `a==b`, `a!=b`, `a in (x,y)`,
    /// `a notin (x)`, `a`, `!a`, joined by commas.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for term in split_terms(s) {
            let requirement = if let Some(key) = term.strip_prefix('!') {
                Requirement {
                    key: key.trim().to_string(),
                    operator: Operator::DoesNotExist,
                    values: vec![],
                }
            } else if let Some((key, value)) = term.split_once("!=") {
                Requirement {
                    key: key.trim().to_string(),
                    operator: Operator::NotEquals,
                    values: vec![value.trim().to_string()],
                }
            } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Requirement {
                    key: key.trim().to_string(),
                    operator: Operator::Equals,
                    values: vec![value.trim().to_string()],
                }
            } else if let Some((key, rest)) = term.split_once(char::is_whitespace) {
                let rest = rest.trim_start();
                let (operator, values) = if let Some(v) = rest.strip_prefix("notin") {
                    (Operator::NotIn, v)
                } else if let Some(v) = rest.strip_prefix("in") {
                    (Operator::In, v)
                } else {
                    return Err(ApiError::bad_request(format!("invalid label selector term {term:?}")));
                };
                Requirement {
                    key: key.to_string(),
                    operator,
                    values: parse_set(values)?,
                }
            } else {
                Requirement {
                    key: term.to_string(),
                    operator: Operator::Exists,
                    values: vec![],
                }
            };
            if requirement.key.is_empty() {
                return Err(ApiError::bad_request(format!("invalid label selector term {term:?}")));
            }
            requirements.push(requirement);
        }
        Ok(LabelSelector { requirements })
    }

    /// Builds a selector from a `LabelSelector` object (`matchLabels`, `matchExpressions`).
    ///
    /// A null or absent selector yields the empty selector, which matches everything.
    pub fn from_object(selector: &Value) -> Self {
        let mut requirements = Vec::new();
        if let Some(labels) = selector["matchLabels"].as_object() {
            for (key, value) in labels {
                requirements.push(Requirement {
                    key: key.clone(),
                    operator: Operator::Equals,
                    values: vec![jsonpath::display(value)],
                });
            }
        }
        for expr in selector["matchExpressions"].as_array().into_iter().flatten() {
            let operator = match expr["operator"].as_str() {
                Some("In") => Operator::In,
                Some("NotIn") => Operator::NotIn,
                Some("Exists") => Operator::Exists,
                Some("DoesNotExist") => Operator::DoesNotExist,
                _ => continue,
            };
            requirements.push(Requirement {
                key: expr["key"].as_str().unwrap_or_default().to_string(),
                operator,
                values: expr["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(jsonpath::display)
                    .collect(),
            });
        }
        LabelSelector { requirements }
    }

    /// Builds a selector from a plain label map, as in a Service's `spec.selector`.
    pub fn from_map(labels: &Map<String, Value>) -> Self {
        Self::from_object(&serde_json::json!({ "matchLabels": labels }))
    }

    /// True when the selector has no requirement.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether an object with these `metadata.labels` matches.
    pub fn matches_labels(&self, labels: &Value) -> bool {
        self.requirements
            .iter()
            .all(|r| r.matches(labels.get(&r.key).and_then(Value::as_str)))
    }

    /// Whether the object's `metadata.labels` match.
    pub fn matches(&self, object: &Value) -> bool {
        self.matches_labels(&object["metadata"]["labels"])
    }
}

impl std::fmt::Display for LabelSelector {
    /// Renders the selector in query syntax, as `Scale.status.selector` carries it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let terms: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match r.operator {
                Operator::Equals => format!("{}={}", r.key, r.values.join(",")),
                Operator::NotEquals => format!("{}!={}", r.key, r.values.join(",")),
                Operator::In => format!("{} in ({})", r.key, r.values.join(",")),
                Operator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            })
            .collect();
        f.write_str(&terms.join(","))
    }
}

/// A parsed field selector: `path=value` and `path!=value` terms on any dotted field path
/// (`metadata.name`, `metadata.namespace`, `status.phase`, `spec.nodeName`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    terms: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses the `fieldSelector` query syntax.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for term in split_terms(s) {
            let (path, equal, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (p, true, v)
            } else {
                return Err(ApiError::bad_request(format!("invalid field selector term {term:?}")));
            };
            terms.push((format!(".{}", path.trim()), equal, value.trim().to_string()));
        }
        Ok(FieldSelector { terms })
    }

    /// Whether the object matches every term; an absent field reads as the empty string.
    pub fn matches(&self, object: &Value) -> bool {
        self.terms.iter().all(|(path, equal, value)| {
            let actual = jsonpath::get(object, path).map(jsonpath::display).unwrap_or_default();
            (actual == *value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"name": "x", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn label_selector_supports_every_operator() {
        let obj = labelled(json!({"app": "raftkv", "tier": "db"}));
        for (selector, expected) in [
            ("app=raftkv", true),
            ("app==raftkv", true),
            ("app!=raftkv", false),
            ("app in (raftkv, other)", true),
            ("tier notin (db)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing,app=raftkv", true),
            ("missing!=x", true),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(selector).unwrap().matches(&obj),
                expected,
                "{selector}"
            );
        }
    }

    #[test]
    fn label_selector_objects_render_as_query_syntax() {
        let sel = LabelSelector::from_object(&json!({"matchLabels": {"app": "a"},
            "matchExpressions": [{"key": "k", "operator": "In", "values": ["x", "y"]}]}));
        assert_eq!(sel.to_string(), "app=a,k in (x,y)");
        assert_eq!(LabelSelector::parse(&sel.to_string()).unwrap(), sel);
    }

    #[test]
    fn field_selector_reads_metadata_fields() {
        let obj = labelled(json!({}));
        assert!(FieldSelector::parse("metadata.name=x").unwrap().matches(&obj));
        assert!(FieldSelector::parse("metadata.namespace!=other").unwrap().matches(&obj));
        assert!(!FieldSelector::parse("metadata.name=y").unwrap().matches(&obj));
    }
}
