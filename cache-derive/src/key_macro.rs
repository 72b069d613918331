//! `key!("template", name = value, ...)`: renders a key, checking at compile time that the values match the
//! placeholders exactly and that some entity declares the template.

use proc_macro2::{Literal, TokenStream};
use quote::{quote, quote_spanned};
use syn::ext::IdentExt as _;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, LitStr, Token};

use crate::ast::unraw;
use crate::attr::{closest, default_crate};
use crate::ctxt::Ctxt;
use crate::expand::{render_tokens, template_tokens};
use crate::valid;

struct Input {
    /// `Entity =>`: which entity's declaration to check, when several declare the identical template.
    entity: Option<syn::Path>,
    template: LitStr,
    args: Vec<Arg>,
}

/// `name = value`, or `name` alone for `name = name`.
struct Arg {
    name: Ident,
    value: Expr,
}

impl Parse for Input {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let entity = if input.peek(LitStr) {
            None
        } else {
            let path = input.parse()?;
            input.parse::<Token![=>]>()?;
            Some(path)
        };
        let template: LitStr = input.parse()?;
        let mut args = Vec::new();
        if input.parse::<Option<Token![,]>>()?.is_some() {
            for arg in Punctuated::<Arg, Token![,]>::parse_terminated(input)? {
                args.push(arg);
            }
        }
        Ok(Self {
            entity,
            template,
            args,
        })
    }
}

impl Parse for Arg {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let name = Ident::parse_any(input)?;
        let value = if input.parse::<Option<Token![=]>>()?.is_some() {
            input.parse()?
        } else {
            syn::parse_quote!(#name)
        };
        Ok(Self { name, value })
    }
}

// Long on purpose: parsing, checking and the generated block of one `key!` call, in the order they happen.
pub(crate) fn expand(input: TokenStream) -> TokenStream {
    let input: Input = match syn::parse2(input) {
        Ok(input) => input,
        Err(e) => {
            let message = format!(
                "{e}; expected key!(\"prefix:<field>\", field = value, ...) or key!(Entity => \"prefix:<field>\", ...)"
            );
            return syn::Error::new(e.span(), message).to_compile_error();
        }
    };
    let mut cx = Ctxt::default();
    let Some(parsed) = valid::report(
        &mut cx,
        &input.template,
        cache_template::parse(&input.template.value()),
    ) else {
        return cx.into_compile_errors();
    };
    let placeholders: Vec<&str> = parsed.placeholders().collect();
    for (i, arg) in input.args.iter().enumerate() {
        let name = unraw(&arg.name);
        if input.args[..i].iter().any(|a| a.name == arg.name) {
            cx.error_spanned_by(
                &arg.name,
                format!("`{name}` is given twice: give each placeholder one value"),
            );
        } else if !placeholders.contains(&name.as_str()) {
            let hint = closest(&name, placeholders.iter().copied())
                .map(|p| format!("did you mean `{p}`? "))
                .unwrap_or_default();
            cx.error_spanned_by(
                &arg.name,
                format!(
                    "\"{}\" has no placeholder `<{name}>`: {hint}remove this value",
                    parsed.text
                ),
            );
        }
    }
    for name in &placeholders {
        if !input.args.iter().any(|a| unraw(&a.name) == *name) {
            cx.error_spanned_by(
                &input.template,
                format!(
                    "missing a value for placeholder `<{name}>` of \"{}\": add `{name} = …`",
                    parsed.text
                ),
            );
        }
    }
    if cx.has_errors() {
        return errors_as_expr(cx);
    }

    let id = Literal::u64_suffixed(parsed.id());
    let span = input.template.span();
    let entity = input
        .entity
        .as_ref()
        .map_or_else(|| quote!(_), |path| quote!(#path));
    let check = quote_spanned! {span=>
        const _: () = ::cache_runtime::__private::declared::<::cache_runtime::__private::TemplateId<#id>, #entity>();
    };
    // `key!` has no `crate = "…"`: it names the runtime `::cache_runtime`.
    let krate = &default_crate();
    let template = template_tokens(&parsed, krate);
    let render = render_tokens(&parsed, krate, &quote!(&__TEMPLATE), |name| {
        let value = input
            .args
            .iter()
            .find(|a| unraw(&a.name) == name)
            .map(|a| &a.value);
        quote!(&(#value))
    });
    quote! {{
        #check
        static __TEMPLATE: ::cache_runtime::__private::Template = #template;
        #render
    }}
}

/// The errors, as an expression of type `Key`, so that the call site type-checks and no error cascades.
fn errors_as_expr(cx: Ctxt) -> TokenStream {
    let errors = cx.into_compile_errors();
    quote!({ #errors ::cache_runtime::__private::fallback_key() })
}
