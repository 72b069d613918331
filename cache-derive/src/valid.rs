//! Checks of a parsed entity: templates against fields, field types, duplicates, TTL.

use std::time::Duration;

use cache_template::Template;
use syn::{GenericArgument, LitStr, PathArguments, Type};

use crate::ast::{Container, unraw};
use crate::attr::{closest, parse_ttl};
use crate::ctxt::Ctxt;

/// What expansion needs, once every check passed.
pub(crate) struct Checked<'a> {
    pub(crate) table: String,
    pub(crate) key: Template,
    pub(crate) depends: Vec<Template>,
    pub(crate) variants: Vec<Variant>,
    pub(crate) ttl: Duration,
    /// `refresh`: how long after a read a key counts as hot.
    pub(crate) refresh: Option<Duration>,
    /// Fields used by placeholders, in first-use order.
    pub(crate) used: Vec<&'a crate::ast::Field<'a>>,
}

/// A `variants` template: a declared template (its base) followed by request parameters.
pub(crate) struct Variant {
    pub(crate) template: Template,
    /// The base: `None` for the key, `Some(i)` for `depends[i]`.
    pub(crate) base: Option<usize>,
}

/// The default TTL when the attribute gives none.
const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// Checks the attribute against the struct, reporting every problem to `cx`; `None` when there was one.
pub(crate) fn check<'a>(cx: &mut Ctxt, cont: &'a Container<'a>) -> Option<Checked<'a>> {
    let table = check_table(cx, cont);
    let key = check_key(cx, cont, &table);
    let depends = check_depends(cx, cont);
    let variants = check_variants(cx, cont, key.as_ref(), &depends);
    let ttl = check_ttl(cx, cont);
    let refresh = check_refresh(cx, cont);
    let used = used_fields(cont, key.iter().chain(&depends));
    for field in &used {
        check_type(cx, field.ty, &unraw(field.ident));
    }
    if cx.has_errors() {
        return None;
    }
    Some(Checked {
        table,
        key: key?,
        depends,
        variants,
        ttl,
        refresh,
        used,
    })
}

/// The table: `table = "…"`, or the snake-case struct name plus `s`.
fn check_table(cx: &mut Ctxt, cont: &Container<'_>) -> String {
    let attrs = &cont.attrs;
    match &attrs.table {
        Some(lit) if lit.value().trim().is_empty() => {
            cx.error_spanned_by(
                lit,
                "empty `table`: name the table, e.g. table = \"products\"",
            );
            String::new()
        }
        Some(lit) => lit.value(),
        None => default_table(&cont.ident.to_string()),
    }
}

/// The `key` template: required, with at least one placeholder.
fn check_key(cx: &mut Ctxt, cont: &Container<'_>, table: &str) -> Option<Template> {
    let attrs = &cont.attrs;
    match &attrs.key {
        Some(lit) => {
            let parsed = parse_template(cx, cont, lit);
            if let Some(t) = &parsed
                && t.placeholders().next().is_none()
            {
                cx.error_spanned_by(
                        lit,
                        format!(
                            "key template \"{}\" has no placeholder: a row's key must name the fields that identify \
                             it, e.g. \"{}:<id>\"",
                            t.text,
                            t.text.trim_end_matches(':')
                        ),
                    );
            }
            parsed
        }
        None => {
            let message = format!(
                "missing `key`: add #[cached_entity(key = \"{}:<id>\")] naming the fields that identify a row",
                table.trim_end_matches('s')
            );
            match &attrs.first {
                Some(attr) => cx.error_spanned_by(attr, message),
                None => cx.error_spanned_by(cont.ident, message),
            }
            None
        }
    }
}

/// The `depends` templates: each once, none equal to the key.
fn check_depends(cx: &mut Ctxt, cont: &Container<'_>) -> Vec<Template> {
    let attrs = &cont.attrs;
    let mut depends = Vec::new();
    for (i, lit) in attrs.depends.iter().enumerate() {
        let text = lit.value();
        if attrs.depends[..i]
            .iter()
            .any(|earlier| earlier.value() == text)
        {
            cx.error_spanned_by(
                lit,
                format!("\"{text}\" is listed twice in `depends`: remove the repetition"),
            );
            continue;
        }
        if attrs.key.as_ref().is_some_and(|k| k.value() == text) {
            cx.error_spanned_by(
                lit,
                format!("\"{text}\" is the entity's `key`, which is always invalidated: remove it from `depends`"),
            );
            continue;
        }
        if let Some(t) = parse_template(cx, cont, lit) {
            depends.push(t);
        }
    }
    depends
}

/// The `variants` templates: each extends the longest declared template (`key` or `depends`) it starts
/// with, by a separator and request parameters (placeholders that need not be fields).
fn check_variants(
    cx: &mut Ctxt,
    cont: &Container<'_>,
    key: Option<&Template>,
    depends: &[Template],
) -> Vec<Variant> {
    let attrs = &cont.attrs;
    let declared: Vec<(Option<usize>, &Template)> = key
        .map(|k| (None, k))
        .into_iter()
        .chain(depends.iter().enumerate().map(|(i, t)| (Some(i), t)))
        .collect();
    let mut variants = Vec::new();
    for (i, lit) in attrs.variants.iter().enumerate() {
        let text = lit.value();
        if attrs.variants[..i].iter().any(|v| v.value() == text) {
            cx.error_spanned_by(
                lit,
                format!("\"{text}\" is listed twice in `variants`: remove the repetition"),
            );
            continue;
        }
        let Some(template) = report(cx, lit, cache_template::parse(&text)) else {
            continue;
        };
        let base = declared
            .iter()
            .filter(|(_, t)| extends(&text, &t.text))
            .max_by_key(|(_, t)| t.text.len());
        match base {
            Some(&(base, _)) => variants.push(Variant { template, base }),
            None => {
                let example = key.map_or("product:<id>", |k| k.text.as_str());
                cx.error_spanned_by(
                    lit,
                    format!(
                        "variant \"{text}\" must start with one of this entity's templates (`key` or \
                         `depends`) followed by a separator and its request parameters, e.g. \
                         \"{example}:as:<viewer>\": its entries are invalidated with that template's key"
                    ),
                );
            }
        }
    }
    variants
}

/// Whether `variant` is `base` followed by a separator (a character no rendered value contains) and more.
fn extends(variant: &str, base: &str) -> bool {
    variant
        .strip_prefix(base)
        .and_then(|rest| rest.chars().next())
        .is_some_and(|c| !cache_template::is_value_char(c) && c != '<')
}

/// The `ttl`, or the default.
fn check_ttl(cx: &mut Ctxt, cont: &Container<'_>) -> Duration {
    match &cont.attrs.ttl {
        Some(lit) => parse_ttl(&lit.value()).unwrap_or_else(|message| {
            cx.error_spanned_by(lit, message);
            DEFAULT_TTL
        }),
        None => DEFAULT_TTL,
    }
}

/// The `refresh` window, if given.
fn check_refresh(cx: &mut Ctxt, cont: &Container<'_>) -> Option<Duration> {
    let lit = cont.attrs.refresh.as_ref()?;
    match parse_ttl(&lit.value()) {
        Ok(window) => Some(window),
        Err(_) => {
            cx.error_spanned_by(
                lit,
                format!(
                    "invalid refresh \"{}\": write how long after a read a key stays hot, as a positive \
                     duration such as \"30s\" or \"5m\" (units: ms, s, m, h, d)",
                    lit.value()
                ),
            );
            None
        }
    }
}

/// The fields the templates' placeholders name, each once, in order of first use.
fn used_fields<'a, 't>(
    cont: &'a Container<'a>,
    templates: impl Iterator<Item = &'t Template>,
) -> Vec<&'a crate::ast::Field<'a>> {
    let mut used = Vec::new();
    for t in templates {
        for name in t.placeholders() {
            if let Some(field) = cont.field(name)
                && !used
                    .iter()
                    .any(|f: &&crate::ast::Field<'_>| std::ptr::eq(*f, field))
            {
                used.push(field);
            }
        }
    }
    used
}

/// Parses one template literal and checks its placeholders against the fields.
fn parse_template(cx: &mut Ctxt, cont: &Container<'_>, lit: &LitStr) -> Option<Template> {
    let parsed = report(cx, lit, cache_template::parse(&lit.value()))?;
    let mut ok = true;
    for name in parsed.placeholders().filter(|_| cont.has_fields) {
        if cont.field(name).is_none() {
            ok = false;
            let fields: Vec<String> = cont.fields.iter().map(|f| unraw(f.ident)).collect();
            let hint = match closest(name, fields.iter().map(String::as_str)) {
                Some(best) => format!("did you mean `<{best}>`?"),
                None => format!("the fields are: {}", fields.join(", ")),
            };
            cx.error_spanned_by(
                lit,
                format!(
                    "placeholder `<{name}>` in \"{}\" is not a field of `{}`; {hint}",
                    parsed.text, cont.ident
                ),
            );
        }
    }
    ok.then_some(parsed)
}

/// Reports template grammar errors at the literal's span.
pub(crate) fn report(
    cx: &mut Ctxt,
    lit: &LitStr,
    parsed: Result<Template, Vec<String>>,
) -> Option<Template> {
    parsed
        .map_err(|errors| {
            for message in errors {
                cx.error_spanned_by(lit, message);
            }
        })
        .ok()
}

/// Rejects, with a precise message, the field types that can never render a stable key. Other types are
/// checked by the `KeyPart` bound in the generated code.
fn check_type(cx: &mut Ctxt, ty: &Type, field: &str) {
    let Some(last) = last_segment(ty) else {
        if matches!(ty, Type::Array(_) | Type::Slice(_) | Type::Tuple(_)) {
            cx.error_spanned_by(ty, collection_message(field));
        }
        return;
    };
    let name = last.ident.to_string();
    match name.as_str() {
        "f32" | "f64" => cx.error_spanned_by(
            ty,
            format!(
                "field `{field}` is a float, which cannot be part of a cache key: equal values can render \
                 differently (-0.0, NaN, rounding); key on an integer or text column instead"
            ),
        ),
        "Vec" | "VecDeque" | "HashMap" | "BTreeMap" | "HashSet" | "BTreeSet" | "Json" | "JsonValue" | "Value" => {
            cx.error_spanned_by(ty, collection_message(field));
        }
        "Option" => {
            if let PathArguments::AngleBracketed(args) = &last.arguments
                && let Some(GenericArgument::Type(inner)) = args.args.first() {
                    if last_segment(inner).is_some_and(|s| s.ident == "Option") {
                        cx.error_spanned_by(
                            ty,
                            format!("field `{field}` is a nested Option, which has no single NULL rendering"),
                        );
                    } else {
                        check_type(cx, inner, field);
                    }
                }
        }
        _ => {}
    }
}

fn collection_message(field: &str) -> String {
    format!(
        "field `{field}` is a collection, which cannot be part of a cache key: a key names one row; key on the \
         id column and list the collection's own keys in `depends` of its rows"
    )
}

fn last_segment(ty: &Type) -> Option<&syn::PathSegment> {
    match ty {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last(),
        Type::Group(g) => last_segment(&g.elem),
        Type::Paren(p) => last_segment(&p.elem),
        _ => None,
    }
}

/// Diesel's convention: snake_case of the struct name, plus `s`.
fn default_table(ident: &str) -> String {
    let mut out = String::new();
    for (i, c) in ident.trim_start_matches("r#").char_indices() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_table() {
        assert_eq!(super::default_table("Product"), "products");
        assert_eq!(super::default_table("OrderItem"), "order_items");
        assert_eq!(super::default_table("Category"), "categorys");
    }
}
