//! PostgreSQL's COPY text format, for the entitlements the derivation writes (their `text[]`
//! and `timestamptz` columns are simpler to write as text).

use std::fmt::Write as _;

/// Rows in PostgreSQL's COPY text format: tab-separated, `\N` for NULL, backslash escapes.
#[derive(Default)]
pub(super) struct CopyText {
    pub(super) text: String,
    pub(super) rows: usize,
    /// Whether the current row has a field yet (the next one needs a tab first).
    in_row: bool,
}

impl CopyText {
    fn separator(&mut self) {
        if self.in_row {
            self.text.push('\t');
        }
        self.in_row = true;
    }

    pub(super) fn text(&mut self, value: &str) -> &mut Self {
        self.separator();
        // Runs without a reserved byte are copied whole; the four reserved ones are ASCII, so
        // splitting at them keeps UTF-8 intact.
        let mut rest = value;
        while let Some(at) = rest
            .bytes()
            .position(|b| matches!(b, b'\\' | b'\n' | b'\r' | b'\t'))
        {
            self.text.push_str(&rest[..at]);
            self.text.push_str(match rest.as_bytes()[at] {
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                _ => "\\t",
            });
            rest = &rest[at + 1..];
        }
        self.text.push_str(rest);
        self
    }

    pub(super) fn opt_text(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.text(value),
            None => self.null(),
        }
    }

    fn null(&mut self) -> &mut Self {
        self.separator();
        self.text.push_str("\\N");
        self
    }

    pub(super) fn int(&mut self, value: i64) -> &mut Self {
        self.separator();
        let _ = write!(self.text, "{value}");
        self
    }

    pub(super) fn bool(&mut self, value: bool) -> &mut Self {
        self.separator();
        self.text.push(if value { 't' } else { 'f' });
        self
    }

    /// Ends the current row.
    pub(super) fn end_row(&mut self) {
        self.text.push('\n');
        self.in_row = false;
        self.rows += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_the_format_reserves() {
        let mut text = CopyText::default();
        text.text("a\tb\\c\nd\re").opt_text(None).int(-4).bool(true);
        text.end_row();

        assert_eq!(text.text, "a\\tb\\\\c\\nd\\re\t\\N\t-4\tt\n");
    }
}
