//! Parses `#[cached_entity(...)]` and the `#[sqlx(rename = "…")]` of fields.

use syn::{Attribute, LitStr, Token, punctuated::Punctuated};

use crate::ctxt::Ctxt;
use crate::symbol;

/// The container attribute, keeping the span of every value for error messages.
#[derive(Default)]
pub(crate) struct Attrs {
    pub(crate) table: Option<LitStr>,
    pub(crate) key: Option<LitStr>,
    pub(crate) depends: Vec<LitStr>,
    /// `variants = [...]`: declared templates extended by request parameters.
    pub(crate) variants: Vec<LitStr>,
    pub(crate) ttl: Option<LitStr>,
    /// `refresh = "…"`: how long after a read a key counts as hot.
    pub(crate) refresh: Option<LitStr>,
    /// `crate = "…"`: the path generated code uses for `cache_runtime`.
    pub(crate) krate: Option<syn::Path>,
    /// Where to point when something is missing: the first `#[cached_entity]`, if any.
    pub(crate) first: Option<Attribute>,
}

impl Attrs {
    /// The path generated code names `cache_runtime` by: `crate = "…"`, or `::cache_runtime`.
    pub(crate) fn crate_path(&self) -> syn::Path {
        self.krate.clone().unwrap_or_else(default_crate)
    }

    // Long on purpose: one match over the attribute keys, an arm each; split, the grammar would be scattered.
    pub(crate) fn parse(cx: &mut Ctxt, attrs: &[Attribute]) -> Self {
        let mut out = Self::default();
        let mut seen: Vec<String> = Vec::new();
        for attr in attrs
            .iter()
            .filter(|a| a.path().is_ident(symbol::CACHED_ENTITY))
        {
            out.first.get_or_insert_with(|| attr.clone());
            let result = attr.parse_nested_meta(|meta| {
                let name = meta.path.get_ident().map(ToString::to_string).unwrap_or_default();
                if !symbol::ALL.contains(&name.as_str()) {
                    let shown = quote::ToTokens::to_token_stream(&meta.path).to_string().replace(' ', "");
                    let hint = closest(&shown, symbol::ALL.iter().copied())
                        .map(|s| format!("did you mean `{s}`? "))
                        .unwrap_or_default();
                    cx.error_spanned_by(
                        &meta.path,
                        format!(
                            "unknown key `{shown}` in #[cached_entity(...)]: {hint}expected one of `table`, `key`, \
                             `depends`, `variants`, `ttl`, `refresh`"
                        ),
                    );
                    skip_value(&meta)?;
                    return Ok(());
                }
                if seen.contains(&name) {
                    cx.error_spanned_by(
                        &meta.path,
                        format!("duplicate `{name}` in #[cached_entity(...)]: give it once"),
                    );
                }
                seen.push(name.clone());
                match name.as_str() {
                    symbol::DEPENDS | symbol::VARIANTS => {
                        let value = meta.value()?;
                        let content;
                        syn::bracketed!(content in value);
                        let list = Punctuated::<LitStr, Token![,]>::parse_terminated(&content)?;
                        if name == symbol::DEPENDS {
                            out.depends.extend(list);
                        } else {
                            out.variants.extend(list);
                        }
                    }
                    symbol::CRATE => {
                        let value: LitStr = meta.value()?.parse()?;
                        match value.parse::<syn::Path>() {
                            Ok(path) => {
                                out.krate.get_or_insert(path);
                            }
                            Err(_) => cx.error_spanned_by(
                                &value,
                                format!(
                                    "`crate = \"{}\"` is not a path: give the path by which this crate sees \
                                     cache_runtime, e.g. crate = \"cache_runtime\" or crate = \"my_lib::cache\"",
                                    value.value()
                                ),
                            ),
                        }
                    }
                    other => {
                        let value: LitStr = meta.value()?.parse()?;
                        let slot = match other {
                            symbol::TABLE => &mut out.table,
                            symbol::KEY => &mut out.key,
                            symbol::REFRESH => &mut out.refresh,
                            _ => &mut out.ttl,
                        };
                        slot.get_or_insert(value);
                    }
                }
                Ok(())
            });
            if let Err(e) = result {
                cx.syn_error(syn::Error::new(
                    e.span(),
                    format!(
                        "{e}; expected #[cached_entity(table = \"…\", key = \"…\", depends = [\"…\", …], \
                         ttl = \"10m\")]"
                    ),
                ));
            }
        }
        out
    }
}

/// `::cache_runtime`, what generated code names the runtime by unless `crate = "…"` says otherwise.
pub(crate) fn default_crate() -> syn::Path {
    syn::parse_quote!(::cache_runtime)
}

fn skip_value(meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        let _: syn::Expr = meta.value()?.parse()?;
    } else if meta.input.peek(syn::token::Paren) {
        meta.parse_nested_meta(|inner| skip_value(&inner))?;
    }
    Ok(())
}

/// The string value of `#[sqlx(name = "…")]` (`rename` on fields, `rename_all` on the struct), if any.
/// Other `sqlx` keys are sqlx's to check and are ignored here.
pub(crate) fn sqlx_value(attrs: &[Attribute], name: &str) -> Option<LitStr> {
    let mut value = None;
    for attr in attrs.iter().filter(|a| a.path().is_ident(symbol::SQLX)) {
        let _ = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident(name) {
                value = Some(meta.value()?.parse::<LitStr>()?);
                Ok(())
            } else {
                skip_value(&meta)
            }
        });
    }
    value
}

/// Applies sqlx's `rename_all` rule to a snake_case field name (sqlx reports unknown rules itself).
pub(crate) fn rename_all(rule: &str, field: &str) -> String {
    let words = field.split('_').filter(|w| !w.is_empty());
    let capitalized = |w: &str| {
        let mut c = w.chars();
        c.next()
            .map_or_else(String::new, |f| f.to_uppercase().chain(c).collect())
    };
    match rule {
        "lowercase" => field.to_lowercase(),
        "UPPERCASE" => field.to_uppercase(),
        "SCREAMING_SNAKE_CASE" => field.to_uppercase(),
        "kebab-case" => field.replace('_', "-"),
        "PascalCase" => words.map(capitalized).collect(),
        "camelCase" => {
            let pascal: String = words.map(capitalized).collect();
            let mut c = pascal.chars();
            c.next()
                .map_or_else(String::new, |f| f.to_lowercase().chain(c).collect())
        }
        _ => field.to_owned(),
    }
}

/// The candidate closest to `name` by edit distance, if it is close enough to be a likely typo.
pub(crate) fn closest<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .map(|c| (levenshtein(name, c), c))
        .filter(|&(d, c)| {
            d <= (c.len().max(name.len()) / 3).max(1) || c.contains(name) || name.contains(c)
        })
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Parses a TTL such as `30s`, `10m`, `1h30m`, `500ms` or `1d`.
pub(crate) fn parse_ttl(text: &str) -> Result<std::time::Duration, String> {
    let invalid = || {
        format!(
            "invalid ttl \"{text}\": write a duration such as \"30s\", \"10m\" or \"1h30m\" (units: ms, s, m, h, d)"
        )
    };
    let mut total_ms: u64 = 0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(invalid());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        total_ms = number
            .checked_mul(factor)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(invalid)?;
    }
    if total_ms == 0 {
        return Err(format!(
            "ttl \"{text}\" is zero: every entry needs a TTL as a safety net; give a positive duration such as \"10m\""
        ));
    }
    Ok(std::time::Duration::from_millis(total_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("10m").map(|d| d.as_secs()), Ok(600));
        assert_eq!(parse_ttl("1h30m").map(|d| d.as_secs()), Ok(5400));
        assert_eq!(parse_ttl("500ms").map(|d| d.as_millis()), Ok(500));
        assert_eq!(parse_ttl("2d").map(|d| d.as_secs()), Ok(172_800));
        for bad in ["", "10", "m", "10x", "1.5h", "-1s", "99999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
        assert!(parse_ttl("0s").expect_err("zero").contains("is zero"));
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            closest("catgory_id", ["id", "category_id", "name"].into_iter()),
            Some("category_id")
        );
        assert_eq!(
            closest("dependz", symbol::ALL.iter().copied()),
            Some("depends")
        );
        assert_eq!(closest("zzz", ["id", "name"].into_iter()), None);
    }

    #[test]
    fn rename_all_rules() {
        assert_eq!(rename_all("camelCase", "category_id"), "categoryId");
        assert_eq!(rename_all("PascalCase", "category_id"), "CategoryId");
        assert_eq!(
            rename_all("SCREAMING_SNAKE_CASE", "category_id"),
            "CATEGORY_ID"
        );
        assert_eq!(rename_all("kebab-case", "category_id"), "category-id");
        assert_eq!(rename_all("snake_case", "category_id"), "category_id");
    }
}
