//! Header operations (set, add, set-if-absent, delete, find-and-replace) as the `header`
//! directive and `reverse_proxy`'s `header_up`/`header_down` use them, parsed once.
//!
//! Invariant: names and fixed values are parsed when the config loads; values holding
//! placeholders are rendered per request by [`HeaderOps::render`] before
//! [`HeaderOps::apply`], so a change never reads the map it is changing.

use std::collections::BTreeMap;

use hyper::http::{HeaderMap, HeaderName, HeaderValue};
use labcore::Env;

use crate::context::{Cx, Req};
use crate::placeholders::Template;

/// A header value: fixed, or rendered per request from placeholders.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Fixed(HeaderValue),
    /// The index of its rendering among [`HeaderOps::render`]'s values.
    Dynamic(Template, usize),
}

/// A find-and-replace in a header's values.
#[derive(Clone, Debug)]
struct Replace {
    name: HeaderName,
    search: regex_lite::Regex,
    with: String,
}

impl PartialEq for Replace {
    fn eq(&self, other: &Replace) -> bool {
        self.name == other.name
            && self.search.as_str() == other.search.as_str()
            && self.with == other.with
    }
}

/// Header operations, parsed.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct HeaderOps {
    set: Vec<(HeaderName, Value)>,
    add: Vec<(HeaderName, Value)>,
    default: Vec<(HeaderName, Value)>,
    delete: Vec<HeaderName>,
    replace: Vec<Replace>,
    dynamic: usize,
}

impl HeaderOps {
    /// Parses names and values; an invalid one, or an unknown placeholder, is an error
    /// naming it. `replace` holds (field, regexp, replacement).
    pub(crate) fn build(
        set: &BTreeMap<String, String>,
        add: &BTreeMap<String, String>,
        default: &BTreeMap<String, String>,
        delete: &[String],
        replace: &[(String, String, String)],
        env: &Env,
    ) -> Result<HeaderOps, String> {
        let name = |n: &str| {
            HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("{n:?} is not a header name"))
        };
        let mut dynamic = 0;
        let mut pairs = |map: &BTreeMap<String, String>| {
            map.iter()
                .map(|(n, v)| {
                    let template =
                        Template::parse(v, env).map_err(|m| format!("header {n}: {m}"))?;
                    let value = match template.literal() {
                        Some(text) => Value::Fixed(
                            HeaderValue::from_str(text)
                                .map_err(|_| format!("header {n}: {v:?} is not a header value"))?,
                        ),
                        None => {
                            dynamic += 1;
                            Value::Dynamic(template, dynamic - 1)
                        }
                    };
                    Ok((name(n)?, value))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        let set = pairs(set)?;
        let add = pairs(add)?;
        let default = pairs(default)?;
        let replace = replace
            .iter()
            .map(|(field, search, with)| {
                Ok(Replace {
                    name: name(field)?,
                    search: regex_lite::Regex::new(search)
                        .map_err(|e| format!("header {field}: regexp {search:?}: {e}"))?,
                    with: with.clone(),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(HeaderOps {
            set,
            add,
            default,
            delete: delete.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
            replace,
            dynamic,
        })
    }

    /// Whether any value holds placeholders.
    pub(crate) fn is_dynamic(&self) -> bool {
        self.dynamic > 0
    }

    /// Whether any value names the upstream being tried.
    pub(crate) fn uses_upstream(&self) -> bool {
        self.values()
            .any(|v| matches!(v, Value::Dynamic(t, _) if t.uses_upstream()))
    }

    fn values(&self) -> impl Iterator<Item = &Value> {
        self.set
            .iter()
            .chain(&self.add)
            .chain(&self.default)
            .map(|(_, v)| v)
    }

    /// Renders the values with placeholders, for [`HeaderOps::apply`]. A rendering that is
    /// no header value (a control character from a client's header) becomes empty.
    pub(crate) fn render(&self, req: Req<'_>, cx: &Cx) -> Vec<HeaderValue> {
        if self.dynamic == 0 {
            return Vec::new();
        }
        let mut out = vec![HeaderValue::from_static(""); self.dynamic];
        for value in self.values() {
            if let Value::Dynamic(template, i) = value {
                out[*i] = HeaderValue::from_str(&template.render(req, cx))
                    .unwrap_or_else(|_| HeaderValue::from_static(""));
            }
        }
        out
    }

    /// Applies the operations: delete, set, add, defaults, then replacements; `rendered` is
    /// what [`HeaderOps::render`] gave for this request.
    pub(crate) fn apply(&self, headers: &mut HeaderMap, rendered: &[HeaderValue]) {
        let value = |v: &Value| match v {
            Value::Fixed(v) => v.clone(),
            Value::Dynamic(_, i) => rendered
                .get(*i)
                .cloned()
                .unwrap_or_else(|| HeaderValue::from_static("")),
        };
        for name in &self.delete {
            headers.remove(name);
        }
        for (name, v) in &self.set {
            headers.insert(name.clone(), value(v));
        }
        for (name, v) in &self.add {
            headers.append(name.clone(), value(v));
        }
        for (name, v) in &self.default {
            if !headers.contains_key(name) {
                headers.insert(name.clone(), value(v));
            }
        }
        for r in &self.replace {
            let replaced: Vec<HeaderValue> = headers
                .get_all(&r.name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter_map(|v| {
                    HeaderValue::from_str(&r.search.replace_all(v, r.with.as_str())).ok()
                })
                .collect();
            if !replaced.is_empty() {
                headers.remove(&r.name);
                for v in replaced {
                    headers.append(r.name.clone(), v);
                }
            }
        }
    }
}
