//! The `expression` matcher: the part of CEL that Caddyfiles use, compiled once at load.
//!
//! Understood: string (`'x'`, `"x"`), integer, `true`/`false`/`null`, list `[...]` and map
//! `{'k': v}` literals; placeholders (`{method}`, `{http.request.uri.path}`, `map`
//! destinations), whose values are strings; `==`, `!=`, `<`, `<=`, `>`, `>=`, `in`, `+`,
//! `!`, `&&`, `||` and parentheses; the string methods `startsWith`, `endsWith`, `contains`,
//! `matches` (an unanchored regexp, as CEL's RE2) and `size()`; and Caddy's matcher functions
//! with constant arguments: `path`, `path_regexp`, `host`, `method`, `query`, `header`,
//! `header_regexp`, `protocol` and `remote_ip`, which match as the matchers of those names do.
//! Anything else is refused at load, naming what was not understood.
//!
//! Invariants: evaluation never fails the request: a type error makes the expression false,
//! as in Caddy, with CEL's rule that `true || error` is true and `false && error` false.

use std::collections::BTreeMap;

use regex_lite::Regex;

use crate::context::{Cx, Req};
use crate::matchers::{MatcherSet, MatcherToml, RegexpToml};
use crate::placeholders::Template;

/// A value while evaluating.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Null,
    List(Vec<Value>),
    Map(Vec<(Value, Value)>),
}

/// A type error: the expression is false.
#[derive(Debug)]
struct Fault;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Debug)]
enum Method {
    StartsWith,
    EndsWith,
    Contains,
    /// With its regexp, when the argument is a literal.
    Matches(Option<Regex>),
    Size,
}

#[derive(Clone, Debug)]
enum Node {
    Lit(Value),
    Placeholder(Template),
    List(Vec<Node>),
    Map(Vec<(Node, Node)>),
    Not(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Cmp(Cmp, Box<Node>, Box<Node>),
    In(Box<Node>, Box<Node>),
    Add(Box<Node>, Box<Node>),
    Call(Box<Node>, Method, Vec<Node>),
    Matcher(Box<MatcherSet>),
}

/// A compiled expression.
#[derive(Clone, Debug)]
pub(crate) struct Expression {
    root: Node,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Str(String),
    Int(i64),
    Ident(String),
    Placeholder(String),
    Op(&'static str),
}

fn lex(text: &str) -> Result<Vec<Tok>, String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'\'' || c == b'"' {
            let mut s = Vec::new();
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err("a string is never closed".into()),
                    Some(&q) if q == c => break,
                    Some(b'\\') => {
                        let e = *b.get(i + 1).ok_or("a string is never closed")?;
                        s.push(match e {
                            b'n' => b'\n',
                            b't' => b'\t',
                            b'r' => b'\r',
                            other => other,
                        });
                        i += 2;
                    }
                    Some(&other) => {
                        s.push(other);
                        i += 1;
                    }
                }
            }
            i += 1;
            out.push(Tok::Str(String::from_utf8_lossy(&s).into_owned()));
            continue;
        }
        if c == b'{' {
            // A placeholder as Caddy finds them: `{` a letter, then word characters, `.`, `-`.
            let rest = &text[i + 1..];
            let len = rest
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                .count();
            if len >= 2
                && rest.as_bytes()[0].is_ascii_alphabetic()
                && rest.as_bytes().get(len) == Some(&b'}')
            {
                out.push(Tok::Placeholder(rest[..len].to_owned()));
                i += len + 2;
                continue;
            }
        }
        if c.is_ascii_digit() {
            let len = text[i..].bytes().take_while(u8::is_ascii_digit).count();
            let n = text[i..i + len]
                .parse()
                .map_err(|_| format!("number {:?} is too large", &text[i..i + len]))?;
            out.push(Tok::Int(n));
            i += len;
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            let len = text[i..]
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count();
            out.push(Tok::Ident(text[i..i + len].to_owned()));
            i += len;
            continue;
        }
        let two = text.get(i..i + 2).unwrap_or("");
        let op = ["==", "!=", "<=", ">=", "&&", "||"]
            .into_iter()
            .find(|o| *o == two);
        if let Some(op) = op {
            out.push(Tok::Op(op));
            i += 2;
            continue;
        }
        let one = [
            "<", ">", "!", "(", ")", "[", "]", "{", "}", ",", ".", ":", "+",
        ]
        .into_iter()
        .find(|o| o.as_bytes()[0] == c);
        match one {
            Some(op) => {
                out.push(Tok::Op(op));
                i += 1;
            }
            None => {
                return Err(format!(
                    "{:?} is not understood",
                    text[i..].chars().next().unwrap_or('?')
                ));
            }
        }
    }
    Ok(out)
}

struct Parser<'a> {
    toks: Vec<Tok>,
    at: usize,
    env: &'a labcore::Env,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }

    fn eat(&mut self, op: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Op(o)) if *o == op) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, op: &str) -> Result<(), String> {
        if self.eat(op) {
            Ok(())
        } else {
            Err(format!("expected {op:?}"))
        }
    }

    fn or(&mut self) -> Result<Node, String> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Node::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Node, String> {
        let mut left = self.relation()?;
        while self.eat("&&") {
            left = Node::And(Box::new(left), Box::new(self.relation()?));
        }
        Ok(left)
    }

    fn relation(&mut self) -> Result<Node, String> {
        let left = self.sum()?;
        let cmp = match self.peek() {
            Some(Tok::Op("==")) => Cmp::Eq,
            Some(Tok::Op("!=")) => Cmp::Ne,
            Some(Tok::Op("<")) => Cmp::Lt,
            Some(Tok::Op("<=")) => Cmp::Le,
            Some(Tok::Op(">")) => Cmp::Gt,
            Some(Tok::Op(">=")) => Cmp::Ge,
            Some(Tok::Ident(w)) if w == "in" => {
                self.at += 1;
                return Ok(Node::In(Box::new(left), Box::new(self.sum()?)));
            }
            _ => return Ok(left),
        };
        self.at += 1;
        Ok(Node::Cmp(cmp, Box::new(left), Box::new(self.sum()?)))
    }

    fn sum(&mut self) -> Result<Node, String> {
        let mut left = self.unary()?;
        while self.eat("+") {
            left = Node::Add(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Node, String> {
        if self.eat("!") {
            return Ok(Node::Not(Box::new(self.unary()?)));
        }
        self.postfix()
    }

    fn postfix(&mut self) -> Result<Node, String> {
        let mut node = self.primary()?;
        while self.eat(".") {
            let Some(Tok::Ident(name)) = self.peek().cloned() else {
                return Err("expected a method name after '.'".into());
            };
            self.at += 1;
            self.expect("(")?;
            let args = self.args(")")?;
            let method = match (name.as_str(), args.as_slice()) {
                ("startsWith", [_]) => Method::StartsWith,
                ("endsWith", [_]) => Method::EndsWith,
                ("contains", [_]) => Method::Contains,
                ("matches", [Node::Lit(Value::Str(re))]) => Method::Matches(Some(
                    Regex::new(re).map_err(|e| format!("regexp {re:?}: {e}"))?,
                )),
                ("matches", [_]) => Method::Matches(None),
                ("size", []) => Method::Size,
                (other, _) => {
                    return Err(format!(
                        "method {other}() with these arguments is not supported"
                    ));
                }
            };
            node = Node::Call(Box::new(node), method, args);
        }
        Ok(node)
    }

    fn args(&mut self, close: &str) -> Result<Vec<Node>, String> {
        let mut args = Vec::new();
        if self.eat(close) {
            return Ok(args);
        }
        loop {
            args.push(self.or()?);
            if self.eat(close) {
                return Ok(args);
            }
            self.expect(",")?;
        }
    }

    fn primary(&mut self) -> Result<Node, String> {
        let Some(tok) = self.peek().cloned() else {
            return Err("the expression ends too soon".into());
        };
        self.at += 1;
        match tok {
            Tok::Str(s) => Ok(Node::Lit(Value::Str(s))),
            Tok::Int(n) => Ok(Node::Lit(Value::Int(n))),
            Tok::Placeholder(key) => Ok(Node::Placeholder(Template::parse(
                &format!("{{{key}}}"),
                self.env,
            )?)),
            Tok::Op("(") => {
                let inner = self.or()?;
                self.expect(")")?;
                Ok(inner)
            }
            Tok::Op("[") => Ok(Node::List(self.args("]")?)),
            Tok::Op("{") => {
                let mut pairs = Vec::new();
                if !self.eat("}") {
                    loop {
                        let k = self.or()?;
                        self.expect(":")?;
                        let v = self.or()?;
                        pairs.push((k, v));
                        if self.eat("}") {
                            break;
                        }
                        self.expect(",")?;
                    }
                }
                Ok(Node::Map(pairs))
            }
            Tok::Ident(word) => match word.as_str() {
                "true" => Ok(Node::Lit(Value::Bool(true))),
                "false" => Ok(Node::Lit(Value::Bool(false))),
                "null" => Ok(Node::Lit(Value::Null)),
                "size" if self.eat("(") => {
                    let mut args = self.args(")")?;
                    match args.pop() {
                        Some(arg) if args.is_empty() => {
                            Ok(Node::Call(Box::new(arg), Method::Size, Vec::new()))
                        }
                        _ => Err("size() takes one argument".into()),
                    }
                }
                name if self.eat("(") => {
                    let args = self.args(")")?;
                    matcher(name, &args).map(|m| Node::Matcher(Box::new(m)))
                }
                other => Err(format!("{other:?} is not understood")),
            },
            Tok::Op(op) => Err(format!("{op:?} is not expected here")),
        }
    }
}

/// A constant argument as text.
fn constant(node: &Node) -> Option<Value> {
    match node {
        Node::Lit(v) => Some(v.clone()),
        Node::List(items) => items
            .iter()
            .map(constant)
            .collect::<Option<_>>()
            .map(Value::List),
        Node::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| Some((constant(k)?, constant(v)?)))
            .collect::<Option<_>>()
            .map(Value::Map),
        _ => None,
    }
}

fn strings(args: &[Node], name: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for a in args {
        match constant(a) {
            Some(Value::Str(s)) => out.push(s),
            Some(Value::List(items)) => {
                for i in items {
                    match i {
                        Value::Str(s) => out.push(s),
                        _ => return Err(format!("{name}() takes strings")),
                    }
                }
            }
            _ => return Err(format!("{name}() takes constant strings")),
        }
    }
    if out.is_empty() {
        return Err(format!("{name}() needs an argument"));
    }
    Ok(out)
}

fn string_map(args: &[Node], name: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    let [arg] = args else {
        return Err(format!("{name}() takes one map"));
    };
    let Some(Value::Map(pairs)) = constant(arg) else {
        return Err(format!("{name}() takes a constant map"));
    };
    let mut out = BTreeMap::new();
    for (k, v) in pairs {
        let Value::Str(k) = k else {
            return Err(format!("{name}(): keys are strings"));
        };
        let values = match v {
            Value::Str(s) => vec![s],
            Value::List(items) => items
                .into_iter()
                .map(|i| match i {
                    Value::Str(s) => Ok(s),
                    _ => Err(format!("{name}(): values are strings")),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(format!("{name}(): values are strings or lists of strings")),
        };
        out.insert(k, values);
    }
    Ok(out)
}

/// Caddy's matcher functions, as a matcher set.
fn matcher(name: &str, args: &[Node]) -> Result<MatcherSet, String> {
    let mut toml = MatcherToml::default();
    let regexp = |parts: &[String]| -> Option<(Option<String>, String)> {
        match parts {
            [re] => Some((None, re.clone())),
            [n, re] => Some((Some(n.clone()), re.clone())),
            _ => None,
        }
    };
    match name {
        "path" => toml.path = strings(args, name)?,
        "host" => toml.host = strings(args, name)?,
        "method" => toml.method = strings(args, name)?,
        "remote_ip" => {
            toml.remote_ip = strings(args, name)?;
            if toml.remote_ip.iter().any(|a| a == "forwarded") {
                return Err(crate::matchers::FORWARDED.into());
            }
        }
        "client_ip" => toml.client_ip = strings(args, name)?,
        "protocol" => match strings(args, name)?.as_slice() {
            [p] => toml.protocol = Some(p.clone()),
            _ => return Err("protocol() takes one string".into()),
        },
        "path_regexp" => {
            let (n, pattern) =
                regexp(&strings(args, name)?).ok_or("path_regexp() takes [name,] regexp")?;
            toml.path_regexp = Some(RegexpToml { name: n, pattern });
        }
        "header_regexp" => {
            let parts = strings(args, name)?;
            let (n, field, pattern) = match parts.as_slice() {
                [f, re] => (None, f.clone(), re.clone()),
                [n, f, re] => (Some(n.clone()), f.clone(), re.clone()),
                _ => return Err("header_regexp() takes [name,] field, regexp".into()),
            };
            toml.header_regexp
                .insert(field, RegexpToml { name: n, pattern });
        }
        "header" => toml.header = string_map(args, name)?,
        "query" => toml.query = string_map(args, name)?,
        other => {
            return Err(format!(
                "function {other}() is not supported in expressions (see man edge-caddyfile)"
            ));
        }
    }
    MatcherSet::build(&toml, "")
}

impl Expression {
    /// Compiles `text`; what is not understood is an error naming it.
    pub(crate) fn parse(text: &str, env: &labcore::Env) -> Result<Expression, String> {
        let fail = |m: String| format!("expression {text:?}: {m}");
        let toks = lex(text).map_err(fail)?;
        let mut p = Parser { toks, at: 0, env };
        let root = p.or().map_err(fail)?;
        if let Some(extra) = p.peek() {
            return Err(fail(format!("{extra:?} is not expected here")));
        }
        Ok(Expression { root })
    }

    /// Whether the request matches.
    pub(crate) fn matches(&self, req: Req<'_>, cx: &mut Cx) -> bool {
        matches!(eval(&self.root, req, cx), Ok(Value::Bool(true)))
    }
}

fn truth(node: &Node, req: Req<'_>, cx: &mut Cx) -> Result<bool, Fault> {
    match eval(node, req, cx)? {
        Value::Bool(b) => Ok(b),
        _ => Err(Fault),
    }
}

fn eval(node: &Node, req: Req<'_>, cx: &mut Cx) -> Result<Value, Fault> {
    Ok(match node {
        Node::Lit(v) => v.clone(),
        Node::Placeholder(t) => Value::Str(t.render(req, cx)),
        Node::List(items) => Value::List(
            items
                .iter()
                .map(|i| eval(i, req, cx))
                .collect::<Result<_, _>>()?,
        ),
        Node::Map(pairs) => Value::Map(
            pairs
                .iter()
                .map(|(k, v)| Ok((eval(k, req, cx)?, eval(v, req, cx)?)))
                .collect::<Result<_, _>>()?,
        ),
        Node::Not(inner) => Value::Bool(!truth(inner, req, cx)?),
        // CEL's commutative logic: a decided side wins over an error on the other.
        Node::And(a, b) => {
            let (a, b) = (truth(a, req, cx), truth(b, req, cx));
            match (a, b) {
                (Ok(false), _) | (_, Ok(false)) => Value::Bool(false),
                (Ok(true), Ok(true)) => Value::Bool(true),
                _ => return Err(Fault),
            }
        }
        Node::Or(a, b) => {
            let (a, b) = (truth(a, req, cx), truth(b, req, cx));
            match (a, b) {
                (Ok(true), _) | (_, Ok(true)) => Value::Bool(true),
                (Ok(false), Ok(false)) => Value::Bool(false),
                _ => return Err(Fault),
            }
        }
        Node::Cmp(op, a, b) => {
            let (a, b) = (eval(a, req, cx)?, eval(b, req, cx)?);
            let order = match (&a, &b) {
                (Value::Str(x), Value::Str(y)) => Some(x.cmp(y)),
                (Value::Int(x), Value::Int(y)) => Some(x.cmp(y)),
                (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
                _ => None,
            };
            Value::Bool(match op {
                Cmp::Eq => a == b,
                Cmp::Ne => a != b,
                _ => {
                    let o = order.ok_or(Fault)?;
                    match op {
                        Cmp::Lt => o.is_lt(),
                        Cmp::Le => o.is_le(),
                        Cmp::Gt => o.is_gt(),
                        _ => o.is_ge(),
                    }
                }
            })
        }
        Node::In(a, b) => {
            let (a, b) = (eval(a, req, cx)?, eval(b, req, cx)?);
            Value::Bool(match b {
                Value::List(items) => items.contains(&a),
                Value::Map(pairs) => pairs.iter().any(|(k, _)| *k == a),
                _ => return Err(Fault),
            })
        }
        Node::Add(a, b) => match (eval(a, req, cx)?, eval(b, req, cx)?) {
            (Value::Str(x), Value::Str(y)) => Value::Str(x + &y),
            (Value::Int(x), Value::Int(y)) => Value::Int(x.checked_add(y).ok_or(Fault)?),
            (Value::List(mut x), Value::List(y)) => {
                x.extend(y);
                Value::List(x)
            }
            _ => return Err(Fault),
        },
        Node::Call(target, method, args) => {
            let target = eval(target, req, cx)?;
            let arg = match args.first() {
                Some(a) => Some(eval(a, req, cx)?),
                None => None,
            };
            match (method, target, arg) {
                (Method::Size, Value::Str(s), None) => Value::Int(s.chars().count() as i64),
                (Method::Size, Value::List(l), None) => Value::Int(l.len() as i64),
                (Method::Size, Value::Map(m), None) => Value::Int(m.len() as i64),
                (Method::StartsWith, Value::Str(s), Some(Value::Str(p))) => {
                    Value::Bool(s.starts_with(&p))
                }
                (Method::EndsWith, Value::Str(s), Some(Value::Str(p))) => {
                    Value::Bool(s.ends_with(&p))
                }
                (Method::Contains, Value::Str(s), Some(Value::Str(p))) => {
                    Value::Bool(s.contains(&p))
                }
                (Method::Matches(Some(re)), Value::Str(s), _) => Value::Bool(re.is_match(&s)),
                (Method::Matches(None), Value::Str(s), Some(Value::Str(p))) => {
                    Value::Bool(Regex::new(&p).map_err(|_| Fault)?.is_match(&s))
                }
                _ => return Err(Fault),
            }
        }
        Node::Matcher(set) => Value::Bool(set.matches(req, cx)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_forms_parse_and_the_rest_is_refused_by_name() {
        let env = labcore::Env::default();
        for ok in [
            r#"{method} == "GET""#,
            r#"{path}.startsWith("/api")"#,
            "path('/x*') && header({'X': 'y'})",
            "remote_ip('10.0.0.0/8') || !({method} in ['POST', 'PUT'])",
            "size({query}) > 0 && {path}.matches('^/v[0-9]+/')",
            "{http.request.uri.path} + '/' != '//'",
        ] {
            Expression::parse(ok, &env).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, says) in [
            ("file({'try_files': ['{path}']})", "function file()"),
            ("{path}.lowerAscii()", "method lowerAscii()"),
            ("{method} == ", "ends too soon"),
            ("timestamp('x') > now", "function timestamp()"),
            ("{method} ~ 'x'", "'~'"),
        ] {
            let err = Expression::parse(bad, &env).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
