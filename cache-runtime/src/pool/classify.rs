//! Lexical classification of autocommit statements: may this SQL write?
//!
//! Decides, without a round trip, whether [`CachedPool`](crate::CachedPool) asks the database for the
//! statement's outbox rows after an autocommit statement (see [`WriteDetection`](crate::WriteDetection)).
//!
//! A statement *may write* when its text, outside comments (`--`, nested `/* */`), string literals (`'…'`,
//! `E'…'`), quoted identifiers (`"…"`) and dollar-quoted bodies (`$tag$…$tag$`), contains one of the words
//! [`WRITE_WORDS`] (case-insensitive), except `UPDATE` right after `FOR` or `KEY` (the row-locking clauses
//! `FOR UPDATE` / `FOR NO KEY UPDATE`), or the word `REPLACE` not followed by `(` (SQLite's `REPLACE INTO`;
//! `replace(…)` is the string function).

/// The words that make a statement count as a possible write.
pub const WRITE_WORDS: &[&str] = &[
    "INSERT", "UPDATE", "DELETE", "MERGE", "CALL", "COPY", "TRUNCATE", "DO", "EXECUTE",
];

/// `true` when `sql` may write (see the [module docs](self)).
pub(crate) fn may_write(sql: &str) -> bool {
    let b = sql.as_bytes();
    let mut i = 0;
    let mut previous: Option<&str> = None;
    while i < b.len() {
        let c = b[i];
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0_usize;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => {
                i = skip_string(b, i, false);
                previous = None;
            }
            b'"' => {
                i += 1;
                while i < b.len() {
                    if b[i] == b'"' {
                        if b.get(i + 1) == Some(&b'"') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
                previous = None;
            }
            b'$' => {
                i = skip_dollar(b, i);
                previous = None;
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'_'
                        || b[i] == b'$'
                        || b[i] >= 0x80)
                {
                    i += 1;
                }
                // `E'…'`: a string with backslash escapes.
                if i - start == 1 && (c == b'e' || c == b'E') && b.get(i) == Some(&b'\'') {
                    i = skip_string(b, i, true);
                    previous = None;
                    continue;
                }
                let word = &sql[start..i];
                let writes = WRITE_WORDS.iter().any(|w| w.eq_ignore_ascii_case(word))
                    && !(word.eq_ignore_ascii_case("UPDATE")
                        && previous.is_some_and(|p| {
                            p.eq_ignore_ascii_case("FOR") || p.eq_ignore_ascii_case("KEY")
                        }));
                if writes || is_replace_statement(word, &b[i..]) {
                    return true;
                }
                previous = Some(word);
            }
            // Anything but white space between two words: `FOR`/`KEY` before `UPDATE` no longer make a
            // locking clause (`… WHERE key = $1) UPDATE items …` writes).
            c => {
                if !c.is_ascii_whitespace() {
                    previous = None;
                }
                i += 1;
            }
        }
    }
    false
}

/// `REPLACE` used as a statement (SQLite's `REPLACE INTO t …`), not the function `replace(…)`.
fn is_replace_statement(word: &str, rest: &[u8]) -> bool {
    word.eq_ignore_ascii_case("REPLACE")
        && rest.iter().find(|c| !c.is_ascii_whitespace()) != Some(&b'(')
}

/// Skips the string literal starting at `b[start] == '\''`; returns the index after it.
fn skip_string(b: &[u8], start: usize, backslashes: bool) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' if backslashes => i += 2,
            b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// Skips a dollar-quoted string (or a `$1` parameter) starting at `b[start] == '$'`.
fn skip_dollar(b: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    if b.get(i).is_some_and(u8::is_ascii_digit) {
        return i;
    }
    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80) {
        i += 1;
    }
    if b.get(i) != Some(&b'$') {
        return i;
    }
    let tag = &b[start..=i];
    i += 1;
    while i + tag.len() <= b.len() {
        if &b[i..i + tag.len()] == tag {
            return i + tag.len();
        }
        i += 1;
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use super::may_write;

    #[test]
    fn writes() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "update t set a = 1",
            "  -- comment\n DELETE FROM t",
            "/* a /* nested */ comment */ MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE",
            "WITH x AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM x",
            "CALL p()",
            "COPY t FROM STDIN",
            "TRUNCATE t",
            "DO $$ BEGIN PERFORM 1; END $$",
            "EXECUTE stmt(1)",
            "SELECT 1; UPDATE t SET a = 2",
            "INSERT INTO t VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET a = EXCLUDED.a",
            "SELECT * FROM t FOR UPDATE; DELETE FROM t",
            "REPLACE INTO t (id) VALUES (1)",
            "INSERT OR REPLACE INTO t (id) VALUES (1)",
            "WITH s AS (SELECT v FROM settings WHERE key = $1) UPDATE items SET v = s.v FROM s",
            "WITH s AS (SELECT v FROM settings WHERE key = 'k') UPDATE items SET v = s.v FROM s",
            "WITH s AS (SELECT key FROM settings) UPDATE items SET v = 1",
            "WITH s AS (SELECT v FROM settings FOR UPDATE) UPDATE items SET v = 1",
            "SELECT 1 AS \"for\"; UPDATE t SET a = 1",
        ] {
            assert!(may_write(sql), "{sql}");
        }
    }

    #[test]
    fn reads() {
        for sql in [
            "SELECT * FROM products WHERE id = $1",
            "SELECT 'UPDATE' AS x, \"delete\" FROM t -- insert\n",
            "SELECT E'it\\'s UPDATE' FROM t",
            "SELECT $tag$ DELETE $tag$, $1",
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED",
            "SELECT updated_at, deleted, inserts FROM t",
            "SELECT my_writing_function()",
            "/* UPDATE */ VALUES (1)",
            "SELECT replace(name, 'a', 'b') FROM t",
            "SELECT REPLACE (name, 'a', 'b') FROM t",
            "SELECT * FROM t FOR /* lock */ UPDATE",
            "SELECT * FROM t FOR\n  NO KEY\tUPDATE",
        ] {
            assert!(!may_write(sql), "{sql}");
        }
    }

    mod corpus {
        use proptest::prelude::*;

        use super::may_write;

        /// Writing statements, as words and punctuation to be spelled oddly.
        const WRITES: &[&[&str]] = &[
            &["INSERT", "INTO", "t", "VALUES", "(", "1", ")"],
            &["UPDATE", "t", "SET", "a", "=", "1"],
            &["DELETE", "FROM", "t", "WHERE", "key", "=", "$1"],
            &[
                "WITH", "s", "AS", "(", "SELECT", "v", "FROM", "c", "WHERE", "key", "=", "$1", ")",
                "UPDATE", "t", "SET", "a", "=", "s", ".", "v", "FROM", "s",
            ],
            &[
                "WITH", "s", "AS", "(", "SELECT", "*", "FROM", "c", "FOR", "UPDATE", ")", "DELETE",
                "FROM", "t",
            ],
            &[
                "SELECT", "1", ";", "MERGE", "INTO", "t", "USING", "s", "ON", "true", "WHEN",
                "MATCHED", "THEN", "DELETE",
            ],
            &[
                "WITH",
                "x",
                "AS",
                "(",
                "UPDATE",
                "t",
                "SET",
                "a",
                "=",
                "1",
                "RETURNING",
                "*",
                ")",
                "SELECT",
                "*",
                "FROM",
                "x",
            ],
            &["TRUNCATE", "t"],
            &["CALL", "p", "(", ")"],
            &["COPY", "t", "FROM", "STDIN"],
        ];

        /// Reading statements, with writing words where they do not write.
        const READS: &[&[&str]] = &[
            &["SELECT", "'UPDATE t'", ",", "\"delete\"", "FROM", "t"],
            &["SELECT", "*", "FROM", "t", "FOR", "UPDATE"],
            &[
                "SELECT", "*", "FROM", "t", "FOR", "NO", "KEY", "UPDATE", "SKIP", "LOCKED",
            ],
            &["SELECT", "$x$ INSERT $x$", "FROM", "t"],
            &[
                "SELECT",
                "updated",
                ",",
                "inserted_at",
                "FROM",
                "t",
                "WHERE",
                "key",
                "=",
                "$1",
            ],
        ];

        /// Joins `words` with random white space and comments, in random case (literals kept).
        fn spell(words: &'static [&'static str]) -> impl Strategy<Value = String> {
            let gaps = prop::collection::vec(
                prop_oneof![
                    Just(" ".to_owned()),
                    Just("\n\t".to_owned()),
                    Just(" /* c */ ".to_owned()),
                    Just(" /* a /* nested */ b */ ".to_owned()),
                    Just(" -- line\n".to_owned()),
                ],
                words.len(),
            );
            let cases = prop::collection::vec(any::<bool>(), words.len());
            (gaps, cases).prop_map(move |(gaps, cases)| {
                let mut sql = String::new();
                for ((word, gap), upper) in words.iter().zip(gaps).zip(cases) {
                    let quoted = word.starts_with(['\'', '"', '$']);
                    match (quoted, upper) {
                        (true, _) => sql.push_str(word),
                        (false, true) => sql.push_str(&word.to_ascii_uppercase()),
                        (false, false) => sql.push_str(&word.to_ascii_lowercase()),
                    }
                    sql.push_str(&gap);
                }
                sql
            })
        }

        fn any_write() -> impl Strategy<Value = String> {
            prop::sample::select(WRITES).prop_flat_map(spell)
        }

        fn any_read() -> impl Strategy<Value = String> {
            prop::sample::select(READS).prop_flat_map(spell)
        }

        proptest! {
            #[test]
            fn writing_statements_are_writes_however_spelled(sql in any_write()) {
                prop_assert!(may_write(&sql), "{}", sql);
            }

            #[test]
            fn reading_statements_are_reads_however_spelled(sql in any_read()) {
                prop_assert!(!may_write(&sql), "{}", sql);
            }
        }
    }
}
