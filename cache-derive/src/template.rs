//! The key template grammar: literal text and `<field>` placeholders.
//!
//! A template is parsed once, here; the generated code carries its segments, so the runtime never parses a
//! template string.

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Lit(String),
    Placeholder(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    pub(crate) text: String,
    pub(crate) segments: Vec<Segment>,
}

impl Template {
    /// Placeholder names, in order.
    pub(crate) fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Placeholder(name) => Some(name.as_str()),
            Segment::Lit(_) => None,
        })
    }

    /// The template without placeholder names: `category:<>:products`.
    pub(crate) fn shape(&self) -> String {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Lit(text) => text.as_str(),
                Segment::Placeholder(_) => "<>",
            })
            .collect()
    }

    /// FNV-1a 64 of the text; names the template at the type level (`TemplateId<HASH>`).
    pub(crate) fn id(&self) -> u64 {
        let mut hash = 0xcbf2_9ce4_8422_2325_u64;
        for b in self.text.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash
    }
}

/// The characters a rendered value can contain (mirrors `cache_runtime::is_value_char`).
fn is_value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '%' | '~')
}

/// Parses `text`; every problem found is returned, each as a sentence that says how to fix it.
pub(crate) fn parse(text: &str) -> Result<Template, Vec<String>> {
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
    fn ids_differ_by_text() {
        let a = parse("category:<id>:products").map(|t| t.id());
        let b = parse("category:<category_id>:products").map(|t| t.id());
        assert_ne!(a, b);
    }
}
