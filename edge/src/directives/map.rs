//! `map [matcher] SOURCE {DEST}... { INPUT OUTPUT... ; ~REGEXP OUTPUT... ; default OUTPUT... }`:
//! defines placeholders (`{DEST}`) whose values depend on SOURCE, as Caddy's `map` does.
//!
//! Values are lazy, as in Caddy: passing the `map` only records its [`Table`] in the request's
//! [`Cx`]; `{DEST}` is worked out when something renders it, from the request as it is then
//! (after a later `rewrite`, `{path}` as a source is the new path). The first line whose input
//! matches and whose output for that destination is not `-` decides; an exact input compares
//! the whole rendered source, a `~` input is an unanchored regexp and its output may name
//! groups (`$1`, `${name}`, `$$` for a dollar), as Go's `Regexp.Expand`. No line: the `default`
//! line's output, or nothing (an empty value) when there is none. The first `map` the request
//! passed that has a destination decides it.
//!
//! Invariants: a destination is one plain placeholder name that is not already a built-in
//! placeholder, inputs are distinct, a line has no more outputs than there are destinations;
//! placeholders are refused in a regexp line's output, which Caddy 2.6 sends on as text.

use std::sync::Arc;

use crate::body::ReqBody;
use hyper::http::Request;
use regex_lite::Regex;
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Dir, Handler, Scope, Step, at};
use crate::context::{Cx, MapTable, Req};
use crate::placeholders::Template;

/// One mapping line as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MappingToml {
    /// The exact source value this line is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) input: Option<String>,
    /// Or a regexp the source must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) input_regexp: Option<String>,
    /// One output per destination, in order; "-" maps that destination to nothing here.
    pub(crate) outputs: Vec<String>,
}

/// `map` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// What is looked up ("{host}").
    pub(crate) source: String,
    /// The placeholders defined, without braces.
    pub(crate) destinations: Vec<String>,
    /// The lines, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) mappings: Vec<MappingToml>,
    /// The outputs when no line matches; none: nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) defaults: Option<Vec<String>>,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    let Some((source, dests)) = d.args.split_first() else {
        return Err(d.err("map [matcher] SOURCE {DEST}... { INPUT OUTPUT... }"));
    };
    if dests.is_empty() {
        return Err(d.err("needs at least one destination placeholder"));
    }
    let destinations = dests
        .iter()
        .map(|dest| destination(dest).map_err(|m| d.err(m)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut t = Toml {
        source: source.clone(),
        destinations,
        mappings: Vec::new(),
        defaults: None,
    };
    for sub in d.block.unwrap_or_default() {
        if sub.block.is_some() {
            return Err(at(sub.line, "map: a mapping line takes no block"));
        }
        let Some((input, outputs)) = sub.words.split_first() else {
            continue;
        };
        if outputs.len() > t.destinations.len() {
            return Err(at(
                sub.line,
                format!(
                    "map: {} outputs for {} destinations",
                    outputs.len(),
                    t.destinations.len()
                ),
            ));
        }
        if input == "default" {
            if t.defaults.is_some() {
                return Err(at(sub.line, "map: default is given twice"));
            }
            let mut defaults = outputs.to_vec();
            defaults.resize(t.destinations.len(), String::new());
            t.defaults = Some(defaults);
            continue;
        }
        let mut outputs = outputs.to_vec();
        outputs.resize(t.destinations.len(), "-".to_owned());
        let line = match input.strip_prefix('~') {
            Some(re) => MappingToml {
                input: None,
                input_regexp: Some(re.to_owned()),
                outputs,
            },
            None => MappingToml {
                input: Some(input.clone()),
                input_regexp: None,
                outputs,
            },
        };
        t.mappings.push(line);
    }
    Ok(t)
}

/// A destination's name: `{name}`, one placeholder alone, not a built-in one.
fn destination(dest: &str) -> Result<String, String> {
    let name = dest
        .strip_prefix('{')
        .and_then(|d| d.strip_suffix('}'))
        .filter(|n| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        })
        .ok_or_else(|| format!("destination {dest:?} must be one placeholder, as {{name}}"))?;
    if crate::placeholders::is_builtin(name) {
        return Err(format!(
            "destination {dest:?} is a built-in placeholder and cannot be redefined"
        ));
    }
    Ok(name.to_owned())
}

pub(crate) fn build(
    t: &Toml,
    b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    let n = t.destinations.len();
    if n == 0 {
        return Err("needs at least one destination".to_owned().into());
    }
    for dest in &t.destinations {
        destination(&format!("{{{dest}}}"))?;
    }
    let mut rows = Vec::with_capacity(t.mappings.len());
    let mut seen: Vec<&str> = Vec::new();
    for (i, m) in t.mappings.iter().enumerate() {
        let input = match (&m.input, &m.input_regexp) {
            (Some(text), None) => Input::Exact(text.clone()),
            (None, Some(re)) => Input::Regexp(
                Regex::new(re).map_err(|e| format!("mapping {i}: regexp {re:?}: {e}"))?,
            ),
            _ => {
                return Err(format!("mapping {i}: give input or input_regexp, one of them").into());
            }
        };
        let key = m
            .input
            .as_deref()
            .or(m.input_regexp.as_deref())
            .unwrap_or("");
        if seen.contains(&key) {
            return Err(format!("input {key:?} is mapped twice").into());
        }
        seen.push(key);
        if m.outputs.len() != n {
            return Err(format!(
                "mapping {i} has {} outputs for {n} destinations",
                m.outputs.len()
            )
            .into());
        }
        let outputs = m
            .outputs
            .iter()
            .map(|o| match (o.as_str(), &input) {
                ("-", _) => Ok(None),
                (text, Input::Exact(_)) => {
                    Template::parse(text, b.env).map(|t| Some(Output::Text(t)))
                }
                (text, Input::Regexp(_)) => {
                    let braces = text
                        .char_indices()
                        .any(|(i, c)| c == '{' && !text[..i].ends_with('$'));
                    if braces {
                        return Err(format!(
                            "output {text:?} of regexp input {key:?}: placeholders in a regexp \
                             line's output are sent as text by Caddy 2.6; the edge refuses them"
                        ));
                    }
                    Ok(Some(Output::Expand(text.to_owned())))
                }
            })
            .collect::<Result<Vec<_>, String>>()?;
        rows.push(Row { input, outputs });
    }
    let defaults = match &t.defaults {
        Some(d) if d.len() > n => {
            return Err(format!("{} defaults for {n} destinations", d.len()).into());
        }
        Some(d) => Some(
            d.iter()
                .map(|v| Template::parse(v, b.env))
                .collect::<Result<Vec<_>, String>>()?,
        ),
        None => None,
    };
    Ok(Box::new(Map {
        table: Arc::new(Table {
            source: Template::parse(&t.source, b.env)?,
            destinations: t.destinations.clone(),
            rows,
            defaults,
        }),
    }))
}

#[derive(Debug)]
enum Input {
    Exact(String),
    Regexp(Regex),
}

#[derive(Debug)]
enum Output {
    Text(Template),
    /// Expanded with the regexp's groups.
    Expand(String),
}

#[derive(Debug)]
struct Row {
    input: Input,
    /// One per destination; `None`: this line does not map it.
    outputs: Vec<Option<Output>>,
}

/// A compiled `map`, which requests that pass it carry in their [`Cx`].
#[derive(Debug)]
pub(crate) struct Table {
    source: Template,
    destinations: Vec<String>,
    rows: Vec<Row>,
    defaults: Option<Vec<Template>>,
}

impl MapTable for Table {
    fn lookup(&self, name: &str, req: Req<'_>, cx: &Cx) -> Option<Option<String>> {
        let i = self.destinations.iter().position(|d| d == name)?;
        let input = self.source.render(req, cx);
        for row in &self.rows {
            let Some(output) = &row.outputs[i] else {
                continue;
            };
            match (&row.input, output) {
                (Input::Exact(text), Output::Text(t)) if *text == input => {
                    return Some(Some(t.render(req, cx)));
                }
                (Input::Regexp(re), Output::Expand(template)) => {
                    if let Some(caps) = re.captures(&input) {
                        return Some(Some(expand(re, &caps, template)));
                    }
                }
                _ => {}
            }
        }
        Some(
            self.defaults
                .as_ref()
                .and_then(|d| d.get(i))
                .map(|t| t.render(req, cx)),
        )
    }
}

/// Go's `Regexp.Expand`: `$name` and `${name}` are groups by number or name (the longest run
/// of letters, digits and `_`; a missing group is empty), `$$` a dollar, any other `$` itself.
fn expand(re: &Regex, caps: &regex_lite::Captures<'_>, template: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        let word = |s: &str| {
            s.bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count()
        };
        let (name, tail) = if let Some(inner) = after.strip_prefix('{') {
            let n = word(inner);
            if n > 0 && inner[n..].starts_with('}') {
                (&inner[..n], &inner[n + 1..])
            } else {
                ("", after)
            }
        } else {
            let n = word(after);
            (&after[..n], &after[n..])
        };
        if name.is_empty() {
            out.push('$');
            rest = after;
            continue;
        }
        let group = match name.parse::<usize>() {
            Ok(n) => caps.get(n),
            Err(_) => re
                .capture_names()
                .flatten()
                .any(|g| g == name)
                .then(|| caps.name(name))
                .flatten(),
        };
        if let Some(m) = group {
            out.push_str(m.as_str());
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

#[derive(Debug)]
struct Map {
    table: Arc<Table>,
}

impl Map {
    /// The placeholders it defines.
    fn names(&self) -> String {
        self.table
            .destinations
            .iter()
            .map(|d| format!("{{{d}}}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Handler for Map {
    fn enter<'s>(&'s self, _req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        cx.maps.push(self.table.clone());
        Step::Next
    }

    fn describe(&self) -> String {
        format!("map -> {}", self.names())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regexp_outputs_expand_groups_as_go_does() {
        let re = Regex::new(r"^/(?P<first>[a-z]+)/(\d+)$").unwrap();
        let caps = re.captures("/user/42").unwrap();
        assert_eq!(expand(&re, &caps, "$first-${2}"), "user-42");
        assert_eq!(expand(&re, &caps, "$2x|${2}x"), "|42x");
        assert_eq!(expand(&re, &caps, "$$1 $ ${nope} $9"), "$1 $  ");
    }
}
