//! Node labels and the `node_labels` selectors of roles.
//!
//! A selector matches a node when every key of the selector matches: the node
//! has that label with one of the listed values. `'*': '*'` matches every node;
//! a value of `*` matches any value of that key. An empty selector matches none.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub type Labels = BTreeMap<String, String>;

pub const WILDCARD: &str = "*";

/// A selector value: one string or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LabelValues {
    One(String),
    Many(Vec<String>),
}

impl LabelValues {
    pub fn values(&self) -> &[String] {
        match self {
            LabelValues::One(v) => std::slice::from_ref(v),
            LabelValues::Many(v) => v,
        }
    }
}

pub type LabelSelector = BTreeMap<String, LabelValues>;

pub fn selector_matches(selector: &LabelSelector, labels: &Labels) -> bool {
    if selector.is_empty() {
        return false;
    }
    selector.iter().all(|(key, values)| {
        let values = values.values();
        if key == WILDCARD {
            return values.iter().any(|v| v == WILDCARD);
        }
        match labels.get(key) {
            Some(actual) => values.iter().any(|v| v == WILDCARD || v == actual),
            None => false,
        }
    })
}

/// `env=dev,team=web`, for messages and listings.
pub struct DisplayLabels<'a>(pub &'a Labels);

impl fmt::Display for DisplayLabels<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (k, v) in self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// Checks a label key or value as given in config: printable, no `=` or `,`.
pub fn validate_label(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if s.chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '=' || c == ',')
    {
        return Err(format!(
            "{what} {s:?} has whitespace, '=' or ','; use letters, digits, '-', '_', '.', '/' or ':'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn selector(pairs: &[(&str, &[&str])]) -> LabelSelector {
        pairs
            .iter()
            .map(|(k, vs)| {
                (
                    k.to_string(),
                    LabelValues::Many(vs.iter().map(|v| v.to_string()).collect()),
                )
            })
            .collect()
    }

    #[test]
    fn wildcard_matches_every_node_even_unlabelled() {
        let s = selector(&[("*", &["*"])]);
        assert!(selector_matches(&s, &labels(&[])));
        assert!(selector_matches(&s, &labels(&[("env", "prod")])));
    }

    #[test]
    fn every_key_must_match() {
        let s = selector(&[("env", &["dev", "staging"]), ("team", &["*"])]);
        assert!(selector_matches(
            &s,
            &labels(&[("env", "dev"), ("team", "web")])
        ));
        assert!(!selector_matches(&s, &labels(&[("env", "dev")])));
        assert!(!selector_matches(
            &s,
            &labels(&[("env", "prod"), ("team", "web")])
        ));
    }

    #[test]
    fn empty_selector_matches_nothing() {
        assert!(!selector_matches(&LabelSelector::new(), &labels(&[])));
    }
}
