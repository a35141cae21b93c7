//! The output format every labkit tool offers: text for people, JSON lines for programs.
//!
//! One type for `--format` and `--log-format` alike, so every tool spells the choice the same
//! way and a script can rely on `json` meaning one JSON object per line everywhere.

/// How a tool writes what it reports.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::*;

    #[test]
    fn the_two_formats_are_spelled_text_and_json() {
        let names: Vec<String> = Format::value_variants()
            .iter()
            .filter_map(|f| f.to_possible_value())
            .map(|v| v.get_name().to_owned())
            .collect();
        assert_eq!(names, ["text", "json"]);
        assert_eq!(Format::default(), Format::Text);
    }
}
