//! Names of the roles, databases and extensions pgprov works on, and quoting for SQL.
//!
//! A [`Name`] always matches `^[a-z_][a-z0-9_]{0,62}$` and is not one PostgreSQL reserves, so
//! a bad name is refused before any statement is sent. SQL has no bind parameters for
//! identifiers; statements still quote every identifier ([`quote_ident`]) and literal
//! ([`quote_literal`]) they hold, so safety never rests on validation alone.

use std::fmt;

use labcore::pg::quote_ident;

/// The longest identifier PostgreSQL keeps (`NAMEDATALEN - 1` bytes).
pub(crate) const MAX_LEN: usize = 63;

/// Names PostgreSQL itself uses or reserves, besides everything starting with `pg_`.
const RESERVED: &[&str] = &[
    "postgres",
    "template0",
    "template1",
    "public",
    "none",
    "current_role",
    "current_user",
    "session_user",
];

/// A valid, unreserved role and database name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Name(String);

/// A valid extension name (`uuid-ossp` has a hyphen, so extensions get their own rule).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ExtensionName(String);

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {name:?}: {reason}")]
pub struct NameError {
    /// The name as given.
    pub(crate) name: String,
    /// What is wrong with it.
    pub(crate) reason: String,
}

impl Name {
    /// Checks `text` against pgprov's naming rule.
    pub(crate) fn parse(text: &str) -> Result<Name, NameError> {
        check(text, |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
        })?;
        if RESERVED.contains(&text) || text.starts_with("pg_") {
            return Err(refuse(text, "the name is reserved by PostgreSQL"));
        }
        Ok(Name(text.to_owned()))
    }

    /// The name.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted SQL identifier.
    pub(crate) fn ident(&self) -> String {
        quote_ident(&self.0)
    }
}

impl ExtensionName {
    /// Checks `text` as an extension name: lower-case letters, digits, `_` and `-`.
    pub(crate) fn parse(text: &str) -> Result<ExtensionName, NameError> {
        check(text, |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'
        })?;
        Ok(ExtensionName(text.to_owned()))
    }

    /// The name.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted SQL identifier.
    pub(crate) fn ident(&self) -> String {
        quote_ident(&self.0)
    }
}

fn refuse(text: &str, reason: impl Into<String>) -> NameError {
    NameError {
        name: text.to_owned(),
        reason: reason.into(),
    }
}

/// The rules every name shares: not empty, at most 63 bytes, starting with a lower-case
/// letter or `_`, and the rest from `allowed`.
fn check(text: &str, allowed: impl Fn(char) -> bool) -> Result<(), NameError> {
    let Some(first) = text.chars().next() else {
        return Err(refuse(text, "the name is empty"));
    };
    if text.len() > MAX_LEN {
        return Err(refuse(
            text,
            format!(
                "the name is {} bytes long; PostgreSQL keeps at most {MAX_LEN}",
                text.len()
            ),
        ));
    }
    if let Some(bad) = text.chars().find(|c| !allowed(*c)) {
        let what = match bad {
            'A'..='Z' => "upper-case letters are not allowed".to_owned(),
            ' ' => "spaces are not allowed".to_owned(),
            other => format!("{other:?} is not allowed"),
        };
        return Err(refuse(
            text,
            format!("{what} (use lower-case letters a-z, digits 0-9 and _)"),
        ));
    }
    if !(first.is_ascii_lowercase() || first == '_') {
        return Err(refuse(
            text,
            "the name must start with a lower-case letter a-z or _",
        ));
    }
    Ok(())
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ExtensionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `text` as an SQL string literal: in single quotes, inner single quotes doubled; an
/// escape-string literal when it holds a backslash, so `standard_conforming_strings` does not
/// matter.
pub(crate) fn quote_literal(text: &str) -> String {
    let quoted = text.replace('\'', "''");
    if quoted.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn service_names_are_accepted() {
        for name in ["ci", "dw", "gitea", "jupyterhub", "metabase", "_x", "a1_b2"] {
            assert_eq!(Name::parse(name).unwrap().as_str(), name);
        }
        assert!(Name::parse(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn bad_names_say_what_is_wrong() {
        let cases = [
            ("Metabase", "upper-case"),
            ("meta\"base", "'\"' is not allowed"),
            ("meta base", "spaces"),
            ("a;drop", "';' is not allowed"),
            ("", "empty"),
            ("1abc", "must start"),
            ("postgres", "reserved"),
            ("template0", "reserved"),
            ("template1", "reserved"),
            ("public", "reserved"),
            ("pg_stuff", "reserved"),
        ];
        for (name, needle) in cases {
            let err = Name::parse(name).unwrap_err();
            assert!(err.to_string().contains(needle), "{name}: {err}");
        }
        let long = Name::parse(&"a".repeat(64)).unwrap_err();
        assert!(long.to_string().contains("64 bytes"), "{long}");
    }

    #[test]
    fn extension_names_may_hold_hyphens() {
        assert!(ExtensionName::parse("uuid-ossp").is_ok());
        assert!(ExtensionName::parse("pg_trgm").is_ok());
        assert!(ExtensionName::parse("x;y").is_err());
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b'"), "E'a\\\\b'''");
    }

    proptest! {
        #[test]
        fn accepted_names_match_the_documented_rule(text in "\\PC{0,70}") {
            let rule = text.len() <= MAX_LEN
                && text.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && text.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !text.starts_with("pg_")
                && !RESERVED.contains(&text.as_str());
            prop_assert_eq!(Name::parse(&text).is_ok(), rule);
        }
    }
}
