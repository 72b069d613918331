//! How a placeholder value renders inside a key, and how it parses back.
//!
//! Text renders byte by byte: an *unreserved* byte (`A-Z a-z 0-9 _ . -`) as itself, every other byte as `%XX`
//! with upper-case hex. `NULL` renders as [`NULL_RENDERING`] (`~`), which no escaped text can produce (`~` is
//! not unreserved, so text `~` renders `%7E`). Integers (`-` and digits) and booleans (`true`, `false`) are
//! unreserved text already.
//!
//! So a rendered value only contains the characters of [`is_value_char`], and the grammar requires every
//! placeholder to be followed by a character outside that set: a key parses back to exactly one tuple of values.
//!
//! The database triggers render keys with the same rule in SQL; [`SQL_CLASS`] is the one place their
//! character class comes from.

/// The unreserved punctuation as literal text, for `concat!`: the one definition behind
/// [`UNRESERVED_PUNCTUATION`] and [`SQL_CLASS`].
macro_rules! unreserved_punctuation {
    () => {
        "_.-"
    };
}

/// The punctuation bytes that render as themselves (besides ASCII letters and digits): `_ . -`.
///
/// `-` comes last, so that the text can end a regular-expression character class (see [`SQL_CLASS`]).
pub const UNRESERVED_PUNCTUATION: &str = unreserved_punctuation!();

/// The unreserved bytes as the body of a regular-expression character class: `A-Za-z0-9_.-`.
///
/// The SQL renderers escape every character matching `[^` + this + `]`; it agrees with [`is_unreserved`] on
/// every byte.
///
/// # Examples
///
/// ```
/// assert_eq!(cache_template::SQL_CLASS, "A-Za-z0-9_.-");
/// let sql = format!("regexp_replace(v, '[^{}]', …)", cache_template::SQL_CLASS);
/// # let _ = sql;
/// ```
pub const SQL_CLASS: &str = concat!("A-Za-z0-9", unreserved_punctuation!());

/// What `NULL` / `None` renders as.
pub const NULL_RENDERING: &str = "~";

/// The byte that starts an escape (`%XX`).
const ESCAPE: u8 = b'%';

/// `true` for the bytes that text renders as themselves: `A-Z a-z 0-9 _ . -`.
///
/// # Examples
///
/// ```
/// use cache_template::is_unreserved;
///
/// assert!(is_unreserved(b'a') && is_unreserved(b'-'));
/// assert!(!is_unreserved(b':') && !is_unreserved(b'~') && !is_unreserved(0xC3));
/// ```
pub const fn is_unreserved(b: u8) -> bool {
    if b.is_ascii_alphanumeric() {
        return true;
    }
    let punctuation = UNRESERVED_PUNCTUATION.as_bytes();
    let mut i = 0;
    while i < punctuation.len() {
        if punctuation[i] == b {
            return true;
        }
        i += 1;
    }
    false
}

/// `true` for the characters a rendered value can contain: the unreserved ones, `%` and `~`.
///
/// A template's placeholder must be followed by the end of the template or by a character for which this is
/// `false` (a *separator*, such as `:`); the derive checks it.
///
/// # Examples
///
/// ```
/// use cache_template::is_value_char;
///
/// assert!(is_value_char('7') && is_value_char('%') && is_value_char('~'));
/// assert!(!is_value_char(':') && !is_value_char('/') && !is_value_char('ü'));
/// ```
pub const fn is_value_char(c: char) -> bool {
    c.is_ascii()
        && (is_unreserved(c as u8) || c as u8 == ESCAPE || c as u8 == NULL_RENDERING.as_bytes()[0])
}

/// Appends the rendering of the text `value` to `out`: unreserved bytes as they are, every other UTF-8 byte
/// as `%XX` (upper-case hex).
///
/// # Examples
///
/// ```
/// let mut out = String::new();
/// cache_template::escape_into(&mut out, "a:b ü~");
/// assert_eq!(out, "a%3Ab%20%C3%BC%7E");
/// ```
pub fn escape_into(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if is_unreserved(b) {
            out.push(char::from(b));
        } else {
            out.push(char::from(ESCAPE));
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
}

/// Parses one rendered value back: `Some(None)` for [`NULL_RENDERING`], `Some(Some(text))` for a canonical
/// escape of `text`.
///
/// Returns `None` when `raw` is not the rendering of any value: a byte outside the unreserved ones and `%`, a
/// truncated or non-hex escape, lower-case hex (`%3a` is never rendered), or bytes that are not UTF-8. (An
/// escaped unreserved byte such as `%41` is accepted as `A`, although rendering never produces it.)
///
/// # Examples
///
/// ```
/// use cache_template::unescape;
///
/// assert_eq!(unescape("a%3Ab"), Some(Some("a:b".to_owned())));
/// assert_eq!(unescape("~"), Some(None));
/// assert_eq!(unescape("a%3ab"), None);
/// assert_eq!(unescape("a:b"), None);
/// ```
pub fn unescape(raw: &str) -> Option<Option<String>> {
    if raw == NULL_RENDERING {
        return Some(None);
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            ESCAPE => {
                let hex = raw.get(i + 1..i + 3)?;
                if hex.bytes().any(|b| b.is_ascii_lowercase()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if is_unreserved(b) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn escaped(value: &str) -> String {
        let mut out = String::new();
        escape_into(&mut out, value);
        out
    }

    /// The bytes a regular-expression character class body (ranges `a-z` and single characters) matches.
    fn class_matches(class: &str, b: u8) -> bool {
        let chars: Vec<char> = class.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            if i + 2 < chars.len() && chars[i + 1] == '-' {
                if (chars[i]..=chars[i + 2]).contains(&char::from(b)) {
                    return true;
                }
                i += 3;
            } else {
                if chars[i] == char::from(b) {
                    return true;
                }
                i += 1;
            }
        }
        false
    }

    #[test]
    fn sql_class_agrees_with_is_unreserved_on_every_byte() {
        for b in 0..=u8::MAX {
            assert_eq!(
                class_matches(SQL_CLASS, b),
                is_unreserved(b),
                "byte {b:#04x} ({:?})",
                char::from(b)
            );
        }
        assert!(
            SQL_CLASS.ends_with('-'),
            "a `-` must end the class to be literal"
        );
    }

    #[test]
    fn value_chars_are_unreserved_escape_and_null() {
        for b in 0..=u8::MAX {
            let c = char::from(b);
            assert_eq!(
                is_value_char(c),
                is_unreserved(b) || c == '%' || c == '~',
                "{c:?}"
            );
        }
        assert!(NULL_RENDERING.chars().all(is_value_char));
        assert!(
            !NULL_RENDERING.bytes().any(is_unreserved),
            "NULL must differ from every text"
        );
        assert!(!is_value_char('ü') && !is_value_char('\u{10FFFF}'));
    }

    #[test]
    fn escapes_the_documented_rule() {
        assert_eq!(escaped("a:b%c ü<>{}"), "a%3Ab%25c%20%C3%BC%3C%3E%7B%7D");
        assert_eq!(escaped("~"), "%7E");
        assert_eq!(escaped("AZaz09_.-"), "AZaz09_.-");
        assert_eq!(escaped(""), "");
    }

    #[test]
    fn unescape_rejects_what_is_never_rendered() {
        assert_eq!(unescape("%zz"), None);
        assert_eq!(unescape("%3a"), None, "lower-case hex is not canonical");
        assert_eq!(unescape("%3"), None);
        assert_eq!(unescape("a:b"), None);
        assert_eq!(unescape("%FF"), None, "not UTF-8");
        assert_eq!(unescape("~~"), None);
        assert_eq!(unescape(""), Some(Some(String::new())));
        assert_eq!(unescape("%3A"), Some(Some(":".to_owned())));
    }

    proptest! {
        #[test]
        fn escaped_text_parses_back(s in any::<String>()) {
            prop_assert_eq!(unescape(&escaped(&s)), Some(Some(s)));
        }

        #[test]
        fn escaped_text_uses_only_value_chars(s in any::<String>()) {
            prop_assert!(escaped(&s).chars().all(is_value_char));
        }

        #[test]
        fn distinct_texts_escape_distinctly(a in "[:<>%{}~ _.a-]{0,6}", b in "[:<>%{}~ _.a-]{0,6}") {
            if a != b {
                prop_assert_ne!(escaped(&a), escaped(&b));
            }
            prop_assert_ne!(escaped(&a), NULL_RENDERING);
        }
    }
}
