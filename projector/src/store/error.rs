//! What a failed Postgres call means for the record that caused it: try again later
//! (transient) or never (the record's data), which decides between retrying a batch and
//! isolating the record into a dead letter.

/// How a failure is handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The database or the network, not the data: retried with capped backoff, nothing skipped.
    Transient,
    /// The same records would fail the same way again: the batch is bisected down to the
    /// record, which becomes a dead letter carrying this.
    Data(DataError),
}

/// Why Postgres refused a record, as kept with its dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError {
    /// The five-character SQLSTATE, when Postgres answered one (a decode error has none).
    pub sqlstate: Option<String>,
    pub message: String,
}

impl DataError {
    /// `SQLSTATE 23514: new row … violates check constraint …`: what an operator reads.
    pub fn describe(&self) -> String {
        match &self.sqlstate {
            Some(code) => format!("SQLSTATE {code}: {}", self.message),
            None => self.message.clone(),
        }
    }
}

/// Sorts a SQLSTATE (see the PostgreSQL manual's appendix "PostgreSQL Error Codes").
pub fn sqlstate_is_data_error(code: &str) -> bool {
    match code {
        // Class 42 is mostly a statement that no data can fix. These few say that the schema
        // or the grants are not what this binary expects (a migration missing, a role
        // changed): every record would fail, so dead-lettering them all would only empty the
        // log into the DLQ. Retrying waits for the deployment to be fixed.
        "42501" | "42P01" | "42703" | "42883" | "42704" => false,
        // 54000: an index row or a value too large for Postgres, decided by the record.
        "54000" => true,
        _ => matches!(
            code.get(..2),
            // 21 cardinality violation (two records of a batch hitting one row: bisecting
            // separates them), 22 data exception (NUL bytes, bad numbers, invalid JSON),
            // 23 integrity constraint violation, 42 syntax error or access rule violation.
            Some("21" | "22" | "23" | "42")
        ),
    }
    // Everything else is transient, by design: connection (08), serialization failure and
    // deadlock (40), insufficient resources (53), operator intervention (57: admin shutdown,
    // cannot connect now, statement timeout), system errors (58, XX) and any class not listed.
    // Retrying something that was in fact permanent stalls a partition, visibly, in the logs
    // and the lag; skipping something that was in fact transient would lose data silently.
}

/// Classifies a `sqlx` error.
pub fn classify(error: &sqlx::Error) -> Failure {
    match error {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) if sqlstate_is_data_error(&code) => Failure::Data(DataError {
                sqlstate: Some(code.into_owned()),
                message: db.message().to_owned(),
            }),
            _ => Failure::Transient,
        },
        // A value that cannot be encoded or decoded fails the same way every time.
        sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => {
            Failure::Data(DataError {
                sqlstate: None,
                message: error.to_string(),
            })
        }
        // Io, Tls, Protocol, PoolTimedOut, PoolClosed, WorkerCrashed and whatever sqlx adds.
        _ => Failure::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_concurrency_and_resource_errors_are_transient() {
        for code in [
            "08000", "08003", "08006", "08001", "08004", // connection
            "40001", "40P01", // serialization failure, deadlock
            "57P01", "57P02", "57P03", "57014", // admin shutdown, cannot connect now, timeout
            "53000", "53100", "53200",
            "53300", // insufficient resources, too many connections
            "55P03", "58030", "XX000", "25P02", "0A000",
        ] {
            assert!(!sqlstate_is_data_error(code), "{code} must be retried");
        }
    }

    #[test]
    fn data_integrity_and_statement_errors_isolate_the_record() {
        for code in [
            "22P05", // untranslatable character (a NUL in jsonb)
            "22021", // character not in repertoire (a NUL in text)
            "22P02", "22003", "22001", // invalid text, out of range, too long
            "23505", "23514", "23502", "23503", // unique, check, not null, foreign key
            "42804", "42601", // datatype mismatch, syntax
            "54000", // index row too large
            "21000", // one statement affecting a row twice
        ] {
            assert!(sqlstate_is_data_error(code), "{code} must be isolated");
        }
    }

    #[test]
    fn a_schema_that_does_not_match_the_binary_is_retried_not_dead_lettered() {
        for code in ["42P01", "42703", "42883", "42501", "42704"] {
            assert!(!sqlstate_is_data_error(code), "{code}");
        }
    }

    #[test]
    fn malformed_codes_are_transient() {
        for code in ["", "2", "é2000"] {
            assert!(!sqlstate_is_data_error(code), "{code:?}");
        }
    }

    #[test]
    fn io_and_pool_errors_are_transient_and_decode_errors_are_data() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(classify(&io), Failure::Transient);
        assert_eq!(classify(&sqlx::Error::PoolTimedOut), Failure::Transient);
        assert_eq!(classify(&sqlx::Error::PoolClosed), Failure::Transient);
        let decode = sqlx::Error::Decode("not JSON".into());
        assert!(matches!(
            classify(&decode),
            Failure::Data(DataError { sqlstate: None, .. })
        ));
    }

    #[test]
    fn a_described_data_error_names_its_sqlstate() {
        let error = DataError {
            sqlstate: Some("23514".into()),
            message: "violates check constraint".into(),
        };
        assert_eq!(
            error.describe(),
            "SQLSTATE 23514: violates check constraint"
        );
    }
}
