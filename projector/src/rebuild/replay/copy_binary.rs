//! PostgreSQL's binary COPY format, for the staging tables: each field is its length and its
//! bytes, so neither side scans a snapshot for characters to escape (the text format's cost on
//! both sides, once per byte staged).

/// Rows in the binary COPY format (`COPY … FROM STDIN (FORMAT binary)`): the signature, then per
/// row its field count and per field a length (-1 for NULL) and the value in the type's binary
/// form; the types must be the columns' own (`int8`, `int2`, `bool`, `text`).
pub(super) struct CopyBinary {
    bytes: Vec<u8>,
    pub(super) rows: usize,
    /// Where the current row's field count goes, once the row has a field.
    row_start: Option<usize>,
    fields: i16,
}

/// The signature, the flags (no OIDs) and the length of the header extension (none).
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

impl Default for CopyBinary {
    fn default() -> Self {
        CopyBinary {
            bytes: HEADER.to_vec(),
            rows: 0,
            row_start: None,
            fields: 0,
        }
    }
}

impl CopyBinary {
    fn field(&mut self, value: &[u8]) -> &mut Self {
        self.start_field();
        let length = i32::try_from(value.len()).unwrap_or(i32::MAX);
        self.bytes.extend_from_slice(&length.to_be_bytes());
        self.bytes.extend_from_slice(value);
        self
    }

    fn start_field(&mut self) {
        if self.row_start.is_none() {
            self.row_start = Some(self.bytes.len());
            self.bytes.extend_from_slice(&[0, 0]);
        }
        self.fields += 1;
    }

    pub(super) fn text(&mut self, value: &str) -> &mut Self {
        self.field(value.as_bytes())
    }

    pub(super) fn opt_text(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.text(value),
            None => self.null(),
        }
    }

    pub(super) fn null(&mut self) -> &mut Self {
        self.start_field();
        self.bytes.extend_from_slice(&(-1i32).to_be_bytes());
        self
    }

    /// An `int8`.
    pub(super) fn int(&mut self, value: i64) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    /// An `int2`.
    pub(super) fn small_int(&mut self, value: i16) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    pub(super) fn opt_int(&mut self, value: Option<i64>) -> &mut Self {
        match value {
            Some(value) => self.int(value),
            None => self.null(),
        }
    }

    pub(super) fn bool(&mut self, value: bool) -> &mut Self {
        self.field(&[u8::from(value)])
    }

    /// Ends the current row: its field count goes in front of it.
    pub(super) fn end_row(&mut self) {
        if let Some(start) = self.row_start.take() {
            self.bytes[start..start + 2].copy_from_slice(&self.fields.to_be_bytes());
        }
        self.fields = 0;
        self.rows += 1;
    }

    /// The rows with the format's trailer, for `COPY … FROM STDIN (FORMAT binary)`.
    pub(super) fn finish(mut self) -> Vec<u8> {
        self.bytes.extend_from_slice(&(-1i16).to_be_bytes());
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_counted_lengths_and_big_endian_values() {
        let mut copy = CopyBinary::default();
        copy.text("a\tb")
            .opt_text(None)
            .int(-2)
            .small_int(3)
            .bool(true);
        copy.end_row();

        let mut expected = HEADER.to_vec();
        expected.extend_from_slice(&5i16.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 3, b'a', b'\t', b'b']);
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        expected.extend_from_slice(&[0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]);
        expected.extend_from_slice(&[0, 0, 0, 2, 0, 3]);
        expected.extend_from_slice(&[0, 0, 0, 1, 1]);
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(copy.rows, 1);
        assert_eq!(copy.finish(), expected);
    }
}
