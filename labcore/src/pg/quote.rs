//! Quoting identifiers for SQL text.
//!
//! SQL has no bind parameters for identifiers (role, database, schema names), so statements
//! that name one build it into the text. [`quote_ident`] always quotes, so a name from a
//! config, a catalog or a backup's manifest reads back as exactly that name and can never end
//! the identifier early, whatever it holds.

/// `text` as a quoted SQL identifier: in double quotes, inner double quotes doubled.
pub fn quote_ident(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn inner_quotes_are_doubled() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident(""), "\"\"");
    }

    /// Undoes [`quote_ident`] the way PostgreSQL's lexer reads a quoted identifier.
    fn unquote_ident(quoted: &str) -> Option<String> {
        let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == '"' {
                // A lone quote would end the identifier early.
                if chars.next()? != '"' {
                    return None;
                }
            }
            out.push(c);
        }
        Some(out)
    }

    proptest! {
        #[test]
        fn quoted_identifiers_read_back_as_the_original(text in "\\PC{0,40}") {
            prop_assert_eq!(unquote_ident(&quote_ident(&text)), Some(text));
        }
    }
}
