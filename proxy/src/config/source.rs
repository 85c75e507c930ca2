//! The text being read, and the error that names its file, line and key.

use std::fmt;
use std::ops::Range;

use toml::Spanned;

/// A string from the file, with where it was written (for errors).
pub(super) type Text = Spanned<String>;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {key}: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
    #[error("{var} (environment): {message}")]
    Environment { var: &'static str, message: String },
    /// A setting given on the command line (the demo's `--redis`).
    #[error("{option}: {message}")]
    CommandLine {
        option: &'static str,
        message: String,
    },
}

impl ConfigError {
    /// The key the error is about, as `route[1].ttl` (tests check errors name it).
    #[cfg(test)]
    pub(crate) fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Environment { var, .. } => Some(var),
            ConfigError::CommandLine { option, .. } => Some(option),
            ConfigError::Read { .. } => None,
        }
    }

    /// The 1-based line the error points at.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } => Some(*line),
            ConfigError::Read { .. }
            | ConfigError::Environment { .. }
            | ConfigError::CommandLine { .. } => None,
        }
    }
}

/// The text being validated, to turn spans into lines for error messages.
pub(super) struct Source<'a> {
    pub(super) path: &'a str,
    pub(super) text: &'a str,
}

impl Source<'_> {
    pub(super) fn error(
        &self,
        span: Range<usize>,
        key: impl fmt::Display,
        message: impl fmt::Display,
    ) -> ConfigError {
        let (line, column) = self.position(span.start);
        ConfigError::Invalid {
            path: self.path.to_string(),
            line,
            column,
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, column)
    }

    /// A TOML or serde error, with the key worked out from the text at its span: the
    /// enclosing table (`route[2]`) and the key on that line.
    pub(super) fn toml_error(&self, err: &toml::de::Error) -> ConfigError {
        let span = err.span().unwrap_or(0..0);
        let mut message = err.message().trim().to_string();
        let start = span.start.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[start..]
            .find('\n')
            .map_or(self.text.len(), |i| start + i);
        let line = &self.text[line_start..line_end];
        // The table the error is in: the last header before it, or its own line when
        // the error is about a whole table (a missing field points at its header; one
        // missing from the document has an empty span).
        let scanned = if span.is_empty() { start } else { line_end };
        let mut table = String::new();
        let mut route_index: Option<usize> = None;
        for header in self.text[..scanned].lines().map(str::trim) {
            if header == "[[route]]" {
                route_index = Some(route_index.map_or(0, |i| i + 1));
                table = format!("route[{}]", route_index.unwrap_or(0));
            } else if header.starts_with('[') && header.ends_with(']') {
                table = header
                    .trim_matches(|c| c == '[' || c == ']')
                    .trim()
                    .to_string();
            }
        }
        let mut name = match line.split_once('=') {
            Some((k, _)) if !line.trim_start().starts_with('[') => {
                k.trim().trim_matches('"').to_string()
            }
            _ => String::new(),
        };
        // serde's "missing field `upstream`": name the key that is missing.
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            name = field.to_string();
            message = "is required and missing".to_string();
        }
        let key = match (table.is_empty(), name.is_empty()) {
            (true, true) => "(document)".to_string(),
            (true, false) => name,
            (false, true) => table,
            (false, false) => format!("{table}.{name}"),
        };
        self.error(span, key, message)
    }
}

/// The span of the `i`th `[[route]]` header, for errors about the route as a whole.
pub(super) fn validated_span(src: &Source, i: usize) -> Range<usize> {
    let mut offset = 0;
    let mut seen = 0;
    for line in src.text.split_inclusive('\n') {
        if line.trim() == "[[route]]" {
            if seen == i {
                return offset..offset + line.len();
            }
            seen += 1;
        }
        offset += line.len();
    }
    0..0
}
