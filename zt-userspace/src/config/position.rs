//! Source positions: the line of every key, and errors that name the
//! file, the line and the dotted key.

use std::{collections::BTreeMap, ops::Range, path::Path};

use toml::de::{DeTable, DeValue};

use super::ConfigError;

/// Turns keys into lines for error messages.
pub(crate) struct Locator<'a> {
    pub(crate) path: &'a Path,
    pub(crate) lines: &'a BTreeMap<String, usize>,
}

impl Locator<'_> {
    pub(crate) fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let mut scope = key;
        let line = loop {
            if let Some(line) = self.lines.get(scope) {
                break *line;
            }
            match scope.rfind(['.', '[']) {
                Some(cut) => scope = &scope[..cut],
                None => break 1,
            }
        };
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line,
            key: key.to_owned(),
            message: printable(&message.into()),
        }
    }
}

/// `text` with control characters (a newline) and the characters that
/// reorder text on a terminal (a right-to-left override) escaped: an error
/// message quotes what the file says, and must stay one honest line.
pub(crate) fn printable(text: &str) -> String {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    text.chars()
        .fold(String::with_capacity(text.len()), |mut out, c| {
            if hidden(c) {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
            out
        })
}

/// A key of the file as it appears in a dotted path: bare when TOML
/// allows it bare, else quoted and escaped, so that `"a.b"` is not the
/// table `a`'s key `b` and a newline in a key is not one in a message.
pub(crate) fn path_segment(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_owned()
    } else {
        format!("\"{}\"", printable(&key.escape_default().to_string()))
    }
}

/// Byte offsets where lines start, for offset → line lookups.
pub(crate) struct LineIndex(Vec<usize>);

impl LineIndex {
    pub(crate) fn new(text: &str) -> Self {
        let starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1));
        Self(starts.collect())
    }

    /// 1-based line and column of a byte offset.
    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.0.partition_point(|&start| start <= offset);
        let column = offset - self.0[line - 1] + 1;
        (line, column)
    }
}

/// A key of the document with where its key and value sit in the text.
pub(crate) struct Entry {
    pub(crate) path: String,
    pub(crate) key: Option<Range<usize>>,
    pub(crate) value: Range<usize>,
    /// A table's span is only its `[header]`.
    pub(crate) is_table: bool,
}

pub(crate) fn collect_entries(table: &DeTable<'_>, prefix: &str, out: &mut Vec<Entry>) {
    for (key, value) in table {
        let segment = path_segment(key.get_ref());
        let path = if prefix.is_empty() {
            segment
        } else {
            format!("{prefix}.{segment}")
        };
        out.push(Entry {
            path: path.clone(),
            key: Some(key.span()),
            value: value.span(),
            is_table: is_table(value.get_ref()),
        });
        collect_value(value.get_ref(), &path, out);
    }
}

pub(crate) fn collect_value(value: &DeValue<'_>, path: &str, out: &mut Vec<Entry>) {
    match value {
        DeValue::Table(table) => collect_entries(table, path, out),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{path}[{i}]");
                out.push(Entry {
                    path: path.clone(),
                    key: None,
                    value: item.span(),
                    is_table: is_table(item.get_ref()),
                });
                collect_value(item.get_ref(), &path, out);
            }
        }
        _ => {}
    }
}

pub(crate) fn is_table(value: &DeValue<'_>) -> bool {
    match value {
        DeValue::Table(_) => true,
        DeValue::Array(items) => items.iter().any(|item| item.get_ref().is_table()),
        _ => false,
    }
}

/// The innermost key whose key or value text covers `offset`. A syntax
/// error can leave a table header's span swallowing the broken text, so
/// tables are only considered for errors found after a clean parse.
pub(crate) fn entry_at(entries: &[Entry], offset: usize, syntax: bool) -> Option<&Entry> {
    entries
        .iter()
        .filter(|e| !(syntax && e.is_table))
        .flat_map(|e| e.key.iter().chain([&e.value]).map(move |span| (e, span)))
        .filter(|(_, span)| span.contains(&offset) || (span.is_empty() && span.start == offset))
        // Smallest span first; on a tie (a `[[table]]` header is the span of
        // both the array and its element) the deeper key wins.
        .min_by_key(|(e, span)| (span.len(), std::cmp::Reverse(e.path.len())))
        .map(|(e, _)| e)
}

pub(crate) fn toml_error(
    error: &toml::de::Error,
    syntax: bool,
    entries: &[Entry],
    index: &LineIndex,
    path: &Path,
) -> ConfigError {
    let offset = error.span().map_or(0, |s| s.start);
    let (line, column) = index.position(offset);
    let message = printable(error.message().trim());
    match entry_at(entries, offset, syntax) {
        Some(entry) => ConfigError::Invalid {
            path: path.to_owned(),
            line,
            key: entry.path.clone(),
            message,
        },
        None => ConfigError::Syntax {
            path: path.to_owned(),
            line,
            column,
            message,
        },
    }
}
