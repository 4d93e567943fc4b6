//! Label and field selectors: `a=b`, `a==b`, `a!=b`, `a`, `!a`, comma-separated (AND).

use serde_json::Value;

/// A parsed selector; the empty selector matches everything.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    terms: Vec<Term>,
}

#[derive(Debug, Clone)]
enum Term {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
}

impl Selector {
    /// Parses `k=v,k2!=v2,k3,!k4`. Set-based forms (`in`, `notin`) are refused.
    pub fn parse(text: &str) -> Result<Selector, String> {
        let mut terms = Vec::new();
        for raw in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if raw.contains(" in ") || raw.contains(" notin ") || raw.contains('(') {
                return Err(format!(
                    "set-based selector {raw:?} is not supported by the testbed"
                ));
            }
            let term = if let Some((k, v)) = raw.split_once("!=") {
                Term::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = raw.split_once("==") {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = raw.split_once('=') {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = raw.strip_prefix('!') {
                Term::NotExists(k.trim().into())
            } else {
                Term::Exists(raw.into())
            };
            terms.push(term);
        }
        Ok(Selector { terms })
    }

    /// Matches against `metadata.labels`.
    pub fn matches_labels(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.matches(|k| labels.get(k).and_then(Value::as_str).map(str::to_owned))
    }

    /// Matches against fields: `metadata.name`, `metadata.namespace`, or any dotted path.
    pub fn matches_fields(&self, obj: &Value) -> bool {
        self.matches(|path| {
            let mut v = obj;
            for part in path.split('.') {
                v = v.get(part)?;
            }
            match v {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            }
        })
    }

    fn matches(&self, lookup: impl Fn(&str) -> Option<String>) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Eq(k, v) => lookup(k).as_deref() == Some(v.as_str()),
            Term::NotEq(k, v) => lookup(k).as_deref() != Some(v.as_str()),
            Term::Exists(k) => lookup(k).is_some(),
            Term::NotExists(k) => lookup(k).is_none(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_terms() {
        let o = json!({"metadata": {"name": "x", "labels": {"a": "1", "b": "2"}}});
        assert!(Selector::parse("a=1,b").unwrap().matches_labels(&o));
        assert!(Selector::parse("a==1,!c").unwrap().matches_labels(&o));
        assert!(!Selector::parse("a!=1").unwrap().matches_labels(&o));
        assert!(!Selector::parse("c").unwrap().matches_labels(&o));
        assert!(Selector::parse("").unwrap().matches_labels(&o));
        assert!(
            Selector::parse("metadata.name=x")
                .unwrap()
                .matches_fields(&o)
        );
        assert!(Selector::parse("a in (1)").is_err());
    }
}
