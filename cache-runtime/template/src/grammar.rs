//! The key template grammar: literal text and `<field>` placeholders.
//!
//! A template is parsed once, at compile time, by the derive and `key!`; the generated code carries its
//! segments, so the runtime never parses a template string.
//!
//! A placeholder names a field (`<category_id>`); `<` and `>` only delimit placeholders. A placeholder must be
//! followed by the end of the template or by a *separator*, a character outside [`is_value_char`], so that
//! every key parses back to one set of values.

use crate::escape::is_value_char;
use crate::fnv::fnv1a64;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Literal text, copied into every key as it is.
    Lit(String),
    /// A placeholder: the name of the field whose value fills it.
    Placeholder(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The template as written, e.g. `category:<category_id>:products`.
    pub text: String,
    /// Its literal and placeholder segments, in order.
    pub segments: Vec<Segment>,
}

impl Template {
    /// Placeholder names, in order.
    ///
    /// # Examples
    ///
    /// ```
    /// let t = cache_template::parse("tenant:<tenant>:user:<handle>").map_err(|e| e.join("; "))?;
    /// assert_eq!(t.placeholders().collect::<Vec<_>>(), ["tenant", "handle"]);
    /// # Ok::<(), String>(())
    /// ```
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Placeholder(name) => Some(name.as_str()),
            Segment::Lit(_) => None,
        })
    }

    /// The template without placeholder names: `category:<>:products`.
    ///
    /// Two templates with the same shape render the same keys for the same values.
    ///
    /// # Examples
    ///
    /// ```
    /// let t = cache_template::parse("category:<category_id>:products").map_err(|e| e.join("; "))?;
    /// assert_eq!(t.shape(), "category:<>:products");
    /// # Ok::<(), String>(())
    /// ```
    pub fn shape(&self) -> String {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Lit(text) => text.as_str(),
                Segment::Placeholder(_) => "<>",
            })
            .collect()
    }

    /// FNV-1a 64 of the text: names the template at the type level (`TemplateId<HASH>`), so two templates
    /// of the same shape with different placeholder names have different ids.
    ///
    /// # Examples
    ///
    /// ```
    /// let t = cache_template::parse("a:<id>").map_err(|e| e.join("; "))?;
    /// assert_eq!(t.id(), cache_template::fnv1a64(b"a:<id>"));
    /// # Ok::<(), String>(())
    /// ```
    pub fn id(&self) -> u64 {
        fnv1a64(self.text.as_bytes())
    }
}

/// Parses `text` into its segments.
///
/// # Errors
///
/// Every problem found, each as a sentence that says how to fix it: an empty template, an unbalanced `<` or
/// `>`, an empty placeholder or one that is not a field name, two placeholders that touch, a placeholder
/// followed by a value character, a placeholder used twice.
///
/// # Examples
///
/// ```
/// use cache_template::{parse, Segment};
///
/// let t = parse("product:<id>").map_err(|e| e.join("; "))?;
/// assert_eq!(t.segments, [Segment::Lit("product:".into()), Segment::Placeholder("id".into())]);
/// assert!(parse("product:<id").is_err());
/// # Ok::<(), String>(())
/// ```
// Long on purpose: one pass over the characters, whose state (segments, current literal) every branch shares.
pub fn parse(text: &str) -> Result<Template, Vec<String>> {
    let mut errors = Vec::new();
    if text.is_empty() {
        return Err(vec![
            "empty key template: write literal text and `<field>` placeholders, e.g. \"product:<id>\"".to_owned(),
        ]);
    }
    let mut segments = Vec::new();
    let mut lit = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        match c {
            '<' => {
                let mut name = String::new();
                let mut closed = false;
                for (_, c) in chars.by_ref() {
                    match c {
                        '>' => {
                            closed = true;
                            break;
                        }
                        '<' => break,
                        c => name.push(c),
                    }
                }
                if !closed {
                    errors.push(format!(
                        "unbalanced `<` at byte {start} of \"{text}\": close the placeholder with `>` \
                         (`<` and `>` only delimit placeholders)"
                    ));
                    break;
                }
                if name.is_empty() {
                    errors.push(format!(
                        "empty placeholder `<>` in \"{text}\": name a field of the struct, e.g. `<id>`"
                    ));
                } else if !is_ident(&name) {
                    errors.push(format!(
                        "placeholder `<{name}>` in \"{text}\" is not a field name: a placeholder is a Rust \
                         field name such as `<category_id>`"
                    ));
                }
                if !lit.is_empty() {
                    segments.push(Segment::Lit(std::mem::take(&mut lit)));
                }
                if matches!(segments.last(), Some(Segment::Placeholder(_))) {
                    errors.push(format!(
                        "placeholders `<{}>` and `<{name}>` in \"{text}\" touch: put a separator such as `:` \
                         between them so every key parses back to one set of values",
                        placeholder_name(segments.last())
                    ));
                }
                if let Some(&(_, next)) = chars.peek()
                    && next != '<' && is_value_char(next) {
                        errors.push(format!(
                            "placeholder `<{name}>` in \"{text}\" is followed by `{next}`: follow a placeholder \
                             with a separator (any character but letters, digits, `_ . - % ~`), e.g. `:`, or \
                             end the template with it"
                        ));
                    }
                segments.push(Segment::Placeholder(name));
            }
            '>' => errors.push(format!(
                "unbalanced `>` at byte {start} of \"{text}\": a `>` must close a `<field>` placeholder"
            )),
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        segments.push(Segment::Lit(lit));
    }
    let template = Template {
        text: text.to_owned(),
        segments,
    };
    let mut seen = Vec::new();
    for name in template.placeholders() {
        if seen.contains(&name) {
            errors.push(format!(
                "placeholder `<{name}>` appears twice in \"{text}\": use each field once per template"
            ));
        }
        seen.push(name);
    }
    if errors.is_empty() {
        Ok(template)
    } else {
        Err(errors)
    }
}

fn placeholder_name(segment: Option<&Segment>) -> &str {
    match segment {
        Some(Segment::Placeholder(name)) => name,
        _ => "",
    }
}

fn is_ident(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(text: &str) -> Vec<Segment> {
        parse(text).expect("valid template").segments
    }

    fn error(text: &str) -> String {
        let errors = parse(text).expect_err("invalid template");
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors[0].clone()
    }

    #[test]
    fn literal_and_placeholders() {
        assert_eq!(
            segments("category:<category_id>:products"),
            vec![
                Segment::Lit("category:".into()),
                Segment::Placeholder("category_id".into()),
                Segment::Lit(":products".into())
            ]
        );
        assert_eq!(segments("<id>"), vec![Segment::Placeholder("id".into())]);
        assert_eq!(segments("static"), vec![Segment::Lit("static".into())]);
        assert_eq!(
            parse("a:<x>/<y>").map(|t| t.shape()),
            Ok("a:<>/<>".to_owned())
        );
    }

    #[test]
    fn errors_say_what_to_do() {
        assert!(error("").starts_with("empty key template"));
        assert!(error("a:<id").starts_with("unbalanced `<`"));
        assert!(error("a:<i<d>").starts_with("unbalanced `<`"));
        assert!(error("a:id>").starts_with("unbalanced `>`"));
        assert!(error("a:<>").starts_with("empty placeholder"));
        assert!(error("a:<1d>").contains("is not a field name"));
        assert!(error("a:<a><b>").contains("touch"));
        assert!(error("a:<a>b").contains("is followed by `b`"));
        assert!(error("a:<a>:<a>").contains("appears twice"));
    }

    #[test]
    fn every_problem_is_reported() {
        let errors = parse("a:<a>b<>>").expect_err("invalid template");
        assert_eq!(errors.len(), 3, "{errors:?}");
    }

    #[test]
    fn a_separator_is_any_non_value_char() {
        for sep in [':', '/', '#', '|', ' ', '\u{fc}'] {
            assert!(parse(&format!("a:<x>{sep}<y>")).is_ok(), "{sep:?}");
        }
        for glued in ['a', 'Z', '0', '_', '.', '-', '%', '~'] {
            assert!(parse(&format!("a:<x>{glued}")).is_err(), "{glued:?}");
        }
    }

    #[test]
    fn ids_differ_by_text() {
        let a = parse("category:<id>:products").map(|t| t.id());
        let b = parse("category:<category_id>:products").map(|t| t.id());
        assert_ne!(a, b);
    }

    #[test]
    fn ids_are_pinned() {
        // The ids that the compile-fail snapshots show (`TemplateId<…>`): they must not change between builds.
        assert_eq!(
            parse("category:<category_id>:product").map(|t| t.id()),
            Ok(12_860_894_330_928_356_492)
        );
        assert_eq!(
            parse("a:<id>").map(|t| t.id()),
            Ok(2_539_998_387_502_194_091)
        );
    }
}
