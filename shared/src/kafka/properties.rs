//! The two text formats a managed Kafka hands out: a Java `.properties` file and, inside it,
//! the Java clients' `sasl.jaas.config` value. Pure parsing; what the keys mean is decided in
//! `settings`. Errors name lines and keys, never values (a value may be a password).

/// Largest properties file accepted: provider files are a few hundred bytes.
pub const MAX_PROPERTIES_BYTES: usize = 64 * 1024;

/// One `key=value` entry of a properties file.
#[derive(Clone, PartialEq, Eq)]
pub struct Property {
    pub key: String,
    pub value: String,
    /// 1-based line where the entry starts, for messages.
    pub line: usize,
}

// Values may be secrets: Debug shows the key and line only.
impl std::fmt::Debug for Property {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Property")
            .field("key", &self.key)
            .field("line", &self.line)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PropertiesError {
    #[error("larger than {MAX_PROPERTIES_BYTES} bytes")]
    TooLarge,
    #[error("line {line}: an entry without a key")]
    EmptyKey { line: usize },
    #[error("line {line}: a malformed \\u escape")]
    BadUnicodeEscape { line: usize },
}

/// Parses Java `.properties` text: `key=value`, `key: value` or `key value`; `#` and `!` start
/// comment lines; a line ending in an odd number of backslashes continues on the next one;
/// `\t \n \r \f \uXXXX` and `\<char>` escapes; LF, CRLF or CR line ends. Surrounding whitespace
/// of keys and values is trimmed (Java keeps trailing blanks of a value, which in a downloaded
/// credentials file are only ever a copy-paste accident). A repeated key: the last one wins,
/// as in Java.
pub fn parse_properties(text: &str) -> Result<Vec<Property>, PropertiesError> {
    if text.len() > MAX_PROPERTIES_BYTES {
        return Err(PropertiesError::TooLarge);
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let text = text.replace("\r\n", "\n");
    let physical: Vec<&str> = text.split(['\n', '\r']).collect();
    let mut entries: Vec<Property> = Vec::new();
    let mut index = 0;
    while index < physical.len() {
        let start_line = index + 1;
        let first = physical[index].trim_start();
        index += 1;
        if first.is_empty() || first.starts_with('#') || first.starts_with('!') {
            continue;
        }
        // Join continuation lines: the next line's leading whitespace is dropped.
        let mut logical = String::from(first);
        while ends_in_odd_backslashes(&logical) && index < physical.len() {
            logical.pop();
            logical.push_str(physical[index].trim_start());
            index += 1;
        }
        if ends_in_odd_backslashes(&logical) {
            logical.pop();
        }
        let (raw_key, raw_value) = split_key_value(&logical);
        let key = unescape(raw_key, start_line)?.trim().to_owned();
        if key.is_empty() {
            return Err(PropertiesError::EmptyKey { line: start_line });
        }
        let value = unescape(raw_value.trim(), start_line)?;
        entries.retain(|e| e.key != key);
        entries.push(Property {
            key,
            value,
            line: start_line,
        });
    }
    Ok(entries)
}

fn ends_in_odd_backslashes(line: &str) -> bool {
    line.bytes().rev().take_while(|b| *b == b'\\').count() % 2 == 1
}

/// Splits at the first unescaped `=`, `:` or whitespace; whitespace around the separator, and
/// one `=`/`:` after whitespace, belong to neither side.
fn split_key_value(line: &str) -> (&str, &str) {
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '=' | ':' => return (&line[..i], &line[i + 1..]),
            c if c.is_whitespace() => {
                let rest = line[i..].trim_start();
                let rest = rest
                    .strip_prefix('=')
                    .or_else(|| rest.strip_prefix(':'))
                    .unwrap_or(rest);
                return (&line[..i], rest);
            }
            _ => {}
        }
    }
    (line, "")
}

fn unescape(raw: &str, line: usize) -> Result<String, PropertiesError> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\u{c}'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                let code = (hex.len() == 4)
                    .then(|| u32::from_str_radix(&hex, 16).ok())
                    .flatten()
                    .and_then(char::from_u32)
                    .ok_or(PropertiesError::BadUnicodeEscape { line })?;
                out.push(code);
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    Ok(out)
}

/// The one login module entry of a `sasl.jaas.config` value.
#[derive(Clone, PartialEq, Eq)]
pub struct JaasConfig {
    /// The login module class, e.g. `org.apache.kafka.common.security.plain.PlainLoginModule`.
    pub module: String,
    /// `required`, `requisite`, `sufficient` or `optional`.
    pub flag: String,
    /// Module options in order (`username`, `password`, …).
    pub options: Vec<(String, String)>,
}

impl JaasConfig {
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

// Options carry the password: Debug lists their names only.
impl std::fmt::Debug for JaasConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.options.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("JaasConfig")
            .field("module", &self.module)
            .field("flag", &self.flag)
            .field("options", &names)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JaasError {
    #[error("no login module class")]
    MissingModule,
    #[error("expected a control flag (required, requisite, sufficient or optional) after the login module class")]
    MissingFlag,
    #[error("an option without `=value`")]
    MissingValue,
    #[error("an unterminated quoted value")]
    UnterminatedQuote,
    #[error("more than one login module (Kafka clients take exactly one)")]
    SeveralModules,
    #[error("unexpected `{0}`")]
    Unexpected(char),
}

/// Parses the Java clients' JAAS syntax (what Kafka's `JaasConfig` reads with a
/// `StreamTokenizer`): `<LoginModuleClass> <flag> key="value" key2='value2' key3=value3 ;`.
/// Quoted values take `\"`, `\'`, `\\`, `\n`, `\t`, `\r` escapes; unquoted values run to
/// whitespace or `;`. Kafka insists on the final `;`; a missing one is accepted, text after it
/// is not.
pub fn parse_jaas(text: &str) -> Result<JaasConfig, JaasError> {
    let mut tokens = JaasTokens {
        chars: text.chars().peekable(),
    };
    let module = match tokens.next()? {
        Some(JaasToken::Word(word)) => word,
        Some(JaasToken::Symbol(c)) => return Err(JaasError::Unexpected(c)),
        Some(JaasToken::Quoted(_)) | None => return Err(JaasError::MissingModule),
    };
    let flag = match tokens.next()? {
        Some(JaasToken::Word(word))
            if ["required", "requisite", "sufficient", "optional"]
                .contains(&word.to_ascii_lowercase().as_str()) =>
        {
            word.to_ascii_lowercase()
        }
        _ => return Err(JaasError::MissingFlag),
    };
    let mut options = Vec::new();
    loop {
        match tokens.next()? {
            None => break,
            Some(JaasToken::Symbol(';')) => {
                return match tokens.next()? {
                    None => Ok(JaasConfig {
                        module,
                        flag,
                        options,
                    }),
                    Some(_) => Err(JaasError::SeveralModules),
                };
            }
            Some(JaasToken::Word(name)) => {
                if tokens.next()? != Some(JaasToken::Symbol('=')) {
                    return Err(JaasError::MissingValue);
                }
                let value = match tokens.next()? {
                    Some(JaasToken::Word(v) | JaasToken::Quoted(v)) => v,
                    _ => return Err(JaasError::MissingValue),
                };
                options.retain(|(k, _): &(String, String)| *k != name);
                options.push((name, value));
            }
            Some(JaasToken::Symbol(c)) => return Err(JaasError::Unexpected(c)),
            Some(JaasToken::Quoted(_)) => return Err(JaasError::Unexpected('"')),
        }
    }
    Ok(JaasConfig {
        module,
        flag,
        options,
    })
}

#[derive(Debug, PartialEq, Eq)]
enum JaasToken {
    Word(String),
    Quoted(String),
    Symbol(char),
}

struct JaasTokens<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
}

impl JaasTokens<'_> {
    fn next(&mut self) -> Result<Option<JaasToken>, JaasError> {
        while self.chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(c) = self.chars.next() else {
            return Ok(None);
        };
        match c {
            ';' | '=' => Ok(Some(JaasToken::Symbol(c))),
            // Kafka's tokenizer takes both quotes; Confluent Cloud's snippets use single ones.
            '"' | '\'' => {
                let quote = c;
                let mut value = String::new();
                loop {
                    match self.chars.next() {
                        None => return Err(JaasError::UnterminatedQuote),
                        Some(c) if c == quote => return Ok(Some(JaasToken::Quoted(value))),
                        Some('\\') => match self.chars.next() {
                            None => return Err(JaasError::UnterminatedQuote),
                            Some('n') => value.push('\n'),
                            Some('t') => value.push('\t'),
                            Some('r') => value.push('\r'),
                            Some(other) => value.push(other),
                        },
                        Some(other) => value.push(other),
                    }
                }
            }
            c if is_word_char(c) => {
                let mut word = String::from(c);
                while let Some(c) = self.chars.next_if(|c| is_word_char(*c)) {
                    word.push(c);
                }
                Ok(Some(JaasToken::Word(word)))
            }
            other => Err(JaasError::Unexpected(other)),
        }
    }
}

fn is_word_char(c: char) -> bool {
    !c.is_whitespace() && !matches!(c, ';' | '=' | '"' | '\'')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<(String, String)> {
        parse_properties(text)
            .unwrap()
            .into_iter()
            .map(|p| (p.key, p.value))
            .collect()
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn a_confluent_cloud_file_parses_with_comments_and_blank_lines() {
        let text = "# Required connection configs for Kafka producer, consumer, and admin\n\
                    bootstrap.servers=pkc-abc.eu-west-1.aws.confluent.cloud:9092\n\
                    security.protocol=SASL_SSL\n\
                    sasl.mechanisms=PLAIN\n\
                    \n\
                    ! another comment style\n\
                    sasl.username=KEY\n\
                    sasl.password=SEC=RET\n";
        assert_eq!(
            pairs(text),
            [
                pair(
                    "bootstrap.servers",
                    "pkc-abc.eu-west-1.aws.confluent.cloud:9092"
                ),
                pair("security.protocol", "SASL_SSL"),
                pair("sasl.mechanisms", "PLAIN"),
                pair("sasl.username", "KEY"),
                pair("sasl.password", "SEC=RET"),
            ]
        );
    }

    #[test]
    fn separators_whitespace_and_crlf_follow_java() {
        let text = "  a = 1  \r\nb:2\r\nc 3\r\nd\t=  4\re\n  f =\n";
        assert_eq!(
            pairs(text),
            [
                pair("a", "1"),
                pair("b", "2"),
                pair("c", "3"),
                pair("d", "4"),
                pair("e", ""),
                pair("f", ""),
            ]
        );
    }

    #[test]
    fn continuation_lines_and_escapes_are_decoded() {
        let text =
            "sasl.jaas.config=org.Module required \\\n    username=\"u\" \\\n    password=\"p\";\n\
                    path=C\\:\\\\certs\\\\ca.pem\n\
                    key\\ with\\ space=v\n\
                    uni=\\u00e9t\\u00E9\n\
                    two\\\\=backslash-ends-key\n";
        assert_eq!(
            pairs(text),
            [
                pair(
                    "sasl.jaas.config",
                    "org.Module required username=\"u\" password=\"p\";"
                ),
                pair("path", "C:\\certs\\ca.pem"),
                pair("key with space", "v"),
                pair("uni", "été"),
                pair("two\\", "backslash-ends-key"),
            ]
        );
    }

    #[test]
    fn the_last_of_repeated_keys_wins_and_lines_are_counted() {
        let parsed = parse_properties("# c\na=1\n\na=2\n").unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].value, "2");
        assert_eq!(parsed[0].line, 4);
    }

    #[test]
    fn malformed_input_is_refused_by_line() {
        assert_eq!(
            parse_properties("a=1\n=2\n").unwrap_err(),
            PropertiesError::EmptyKey { line: 2 }
        );
        assert_eq!(
            parse_properties("a=\\u12\n").unwrap_err(),
            PropertiesError::BadUnicodeEscape { line: 1 }
        );
        assert_eq!(
            parse_properties(&"#".repeat(MAX_PROPERTIES_BYTES + 1)).unwrap_err(),
            PropertiesError::TooLarge
        );
    }

    #[test]
    fn property_debug_never_shows_the_value() {
        let parsed = parse_properties("sasl.password=hunter2\n").unwrap();
        let shown = format!("{parsed:?}");
        assert!(shown.contains("sasl.password"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn plain_jaas_gives_username_and_password() {
        let jaas = parse_jaas(
            "org.apache.kafka.common.security.plain.PlainLoginModule required username=\"KEY\" password=\"S3CRET\";",
        )
        .unwrap();
        assert_eq!(
            jaas.module,
            "org.apache.kafka.common.security.plain.PlainLoginModule"
        );
        assert_eq!(jaas.flag, "required");
        assert_eq!(jaas.option("username"), Some("KEY"));
        assert_eq!(jaas.option("password"), Some("S3CRET"));
    }

    #[test]
    fn scram_jaas_with_escapes_unquoted_values_and_odd_spacing() {
        let jaas = parse_jaas(
            "  org.apache.kafka.common.security.scram.ScramLoginModule   REQUIRED\n\tusername = alice\n password=\"p\\\"a;s=s\\\\w\\nd\" ;  ",
        )
        .unwrap();
        assert_eq!(jaas.flag, "required");
        assert_eq!(jaas.option("username"), Some("alice"));
        assert_eq!(jaas.option("password"), Some("p\"a;s=s\\w\nd"));
    }

    #[test]
    fn confluent_clouds_single_quoted_jaas_parses() {
        let jaas = parse_jaas(
            "org.apache.kafka.common.security.plain.PlainLoginModule required username='ABCKEY' password='se\"c\\'ret';",
        )
        .unwrap();
        assert_eq!(jaas.option("username"), Some("ABCKEY"));
        assert_eq!(jaas.option("password"), Some("se\"c'ret"));
    }

    #[test]
    fn jaas_without_the_final_semicolon_is_accepted() {
        let jaas = parse_jaas("x.ScramLoginModule required username=\"a\" password=\"b\"").unwrap();
        assert_eq!(jaas.option("password"), Some("b"));
    }

    #[test]
    fn malformed_jaas_is_refused() {
        for (text, want) in [
            ("", JaasError::MissingModule),
            ("x.Module username=\"a\";", JaasError::MissingFlag),
            ("x.Module required username;", JaasError::MissingValue),
            ("x.Module required username=;", JaasError::MissingValue),
            (
                "x.Module required password=\"abc;",
                JaasError::UnterminatedQuote,
            ),
            (
                "x.Module required a=\"1\"; y.Module required b=\"2\";",
                JaasError::SeveralModules,
            ),
            ("x.Module required =\"1\";", JaasError::Unexpected('=')),
        ] {
            assert_eq!(parse_jaas(text).unwrap_err(), want, "{text:?}");
        }
    }

    #[test]
    fn jaas_debug_lists_option_names_only() {
        let jaas = parse_jaas("x.M required username=\"u\" password=\"hunter2\";").unwrap();
        let shown = format!("{jaas:?}");
        assert!(shown.contains("password"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
