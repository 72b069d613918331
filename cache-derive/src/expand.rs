//! Code generation for `#[derive(CachedEntity)]`.

use proc_macro2::{Literal, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::DeriveInput;
use syn::spanned::Spanned as _;

use cache_template::{Segment, Template};

use crate::ast::{Container, unraw};
use crate::ctxt::Ctxt;
use crate::{fallback, valid};

pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let mut cx = Ctxt::default();
    let cont = Container::from_ast(&mut cx, input);
    match valid::check(&mut cx, &cont) {
        Some(checked) if !cx.has_errors() => expand(&cont, &checked),
        _ => {
            let stub = fallback::stub(&input.ident, &input.generics, &cont.attrs.crate_path());
            let errors = cx.into_compile_errors();
            quote!(#errors #stub)
        }
    }
}

/// `static`-able tokens for a template: `Template::__new(text, shape, &[segments])`, naming the runtime `krate`.
pub(crate) fn template_tokens(t: &Template, krate: &syn::Path) -> TokenStream {
    let text = &t.text;
    let shape = t.shape();
    let segments = t.segments.iter().map(|s| match s {
        Segment::Lit(text) => quote!(#krate::__private::Segment::Lit(#text)),
        Segment::Placeholder(name) => quote!(#krate::__private::Segment::Placeholder(#name)),
    });
    quote!(#krate::__private::Template::__new(#text, #shape, &[#(#segments),*]))
}

/// Statements that render `t` into a `Key`, taking each placeholder's value from `value(name)`.
pub(crate) fn render_tokens(
    t: &Template,
    krate: &syn::Path,
    template: &TokenStream,
    value: impl Fn(&str) -> TokenStream,
) -> TokenStream {
    let steps = t.segments.iter().map(|s| match s {
        Segment::Lit(text) => quote!(.lit(#text)),
        Segment::Placeholder(name) => {
            let v = value(name);
            let span = v
                .clone()
                .into_iter()
                .next()
                .map_or_else(proc_macro2::Span::call_site, |t| t.span());
            quote_spanned!(span=> .part(#v))
        }
    });
    // A method chain, no `let`: no local name can clash with the user's items.
    quote!({
        #krate::__private::KeyBuilder::new(#template) #(#steps)* .finish()
    })
}

/// `impl Declares<Entity> for TemplateId<HASH> {}`: lets `key!` check that the template is declared.
fn declares(t: &Template, ident: &syn::Ident, krate: &syn::Path) -> TokenStream {
    let id = Literal::u64_suffixed(t.id());
    quote! {
        #[automatically_derived]
        #[diagnostic::do_not_recommend]
        impl #krate::__private::Declares<#ident> for #krate::__private::TemplateId<#id> {}
    }
}

/// `impl<DB> KeyedEntity<DB> for Entity`: reading the entity by the values of its own key's placeholders
/// (one value: the field's type; several: a tuple, in the key's order), for every backend that encodes them.
fn keyed_entity(
    cont: &Container<'_>,
    checked: &valid::Checked<'_>,
    krate: &syn::Path,
) -> TokenStream {
    let ident = cont.ident;
    let fields: Vec<_> = checked
        .key
        .placeholders()
        .filter_map(|name| cont.field(name))
        .collect();
    let types: Vec<_> = fields.iter().map(|f| f.ty).collect();
    let (id, values): (TokenStream, Vec<TokenStream>) = match types.as_slice() {
        [ty] => (quote!(#ty), vec![quote!(__id)]),
        _ => {
            let values = (0..types.len())
                .map(|i| {
                    let i = syn::Index::from(i);
                    quote!(&__id.#i)
                })
                .collect();
            (quote!((#(#types,)*)), values)
        }
    };
    let sqlx = quote!(#krate::__private::sqlx);
    let refresh = checked.refresh.map(|window| {
        let ms = Literal::u64_suffixed(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
        quote! {
            const REFRESH: ::core::option::Option<#krate::__private::core::time::Duration> =
                ::core::option::Option::Some(#krate::__private::core::time::Duration::from_millis(#ms));
        }
    });
    quote! {
        #[automatically_derived]
        impl<__DB: #sqlx::Database> #krate::KeyedEntity<__DB> for #ident
        where
            #(#types: for<'__q> #sqlx::Encode<'__q, __DB> + #sqlx::Type<__DB>,)*
        {
            type Id = #id;
            #refresh

            fn key_of(__id: &Self::Id) -> #krate::Key {
                Self::cache_key_for(#(#values),*)
            }

            fn bind_id(
                __id: &Self::Id,
                __args: &mut <__DB as #sqlx::Database>::Arguments,
            ) -> ::core::result::Result<(), #sqlx::error::BoxDynError> {
                #(#sqlx::Arguments::add(__args, #values)?;)*
                ::core::result::Result::Ok(())
            }
        }
    }
}

/// The generated items of a valid entity.
// Long on purpose: the generated items are one `quote!` block, read top to bottom as `cargo expand` shows them.
fn expand(cont: &Container<'_>, checked: &valid::Checked<'_>) -> TokenStream {
    let ident = cont.ident;
    let krate = &cont.attrs.crate_path();
    let type_name = ident.to_string();
    let table = &checked.table;
    let ttl_ms = Literal::u64_suffixed(u64::try_from(checked.ttl.as_millis()).unwrap_or(u64::MAX));

    let key_tokens = template_tokens(&checked.key, krate);
    let dep_idents: Vec<_> = (0..checked.depends.len())
        .map(|i| format_ident!("__DEPENDS_{}", i))
        .collect();
    let dep_tokens = checked.depends.iter().map(|t| template_tokens(t, krate));
    let variant_idents: Vec<_> = (0..checked.variants.len())
        .map(|i| format_ident!("__VARIANT_{}", i))
        .collect();
    let variant_tokens = checked
        .variants
        .iter()
        .map(|v| template_tokens(&v.template, krate));
    let variant_metas = checked.variants.iter().zip(&variant_idents).map(|(v, id)| {
        let base = match v.base {
            None => quote!(&__KEY),
            Some(i) => {
                let dep = &dep_idents[i];
                quote!(&#dep)
            }
        };
        quote!(#krate::__private::Variant { template: &#id, base: #base })
    });

    let columns = checked.used.iter().map(|f| {
        let field = unraw(f.ident);
        let column = &f.column;
        let ty = f.ty;
        let kind = quote_spanned!(ty.span()=> #krate::__private::kind_of::<#ty>());
        quote!(#krate::__private::Column { field: #field, column: #column, kind: #kind })
    });

    // Spanned on the field's type, so a type without a key rendering is reported once, there.
    let self_value = |name: &str| match cont.field(name) {
        Some(f) => {
            let id = f.ident;
            quote_spanned!(f.ty.span()=> &self.#id)
        }
        None => quote!(),
    };
    let render_key = render_tokens(&checked.key, krate, &quote!(&__KEY), self_value);
    let render_deps = checked
        .depends
        .iter()
        .zip(&dep_idents)
        .map(|(t, id)| render_tokens(t, krate, &quote!(&#id), self_value));

    let params: Vec<_> = checked
        .key
        .placeholders()
        .filter_map(|name| cont.field(name))
        .map(|f| {
            let (id, ty) = (f.ident, f.ty);
            quote!(#id: &#ty)
        })
        .collect();
    let render_for = render_tokens(&checked.key, krate, &quote!(&__KEY), |name| {
        let id = cont.field(name).map(|f| f.ident);
        quote!(#id)
    });
    let doc_for = format!(
        "The cache key `{}` of the `{type_name}` with these values.",
        checked.key.text
    );

    let keyed = keyed_entity(cont, checked, krate);

    let mut declared = vec![declares(&checked.key, ident, krate)];
    for t in checked
        .depends
        .iter()
        .chain(checked.variants.iter().map(|v| &v.template))
    {
        declared.push(declares(t, ident, krate));
    }

    quote! {
        #[allow(non_upper_case_globals, clippy::all)]
        const _: () = {
            static __KEY: #krate::__private::Template = #key_tokens;
            #(static #dep_idents: #krate::__private::Template = #dep_tokens;)*
            #(static #variant_idents: #krate::__private::Template = #variant_tokens;)*
            static __META: #krate::__private::EntityMeta = #krate::__private::EntityMeta {
                type_name: #type_name,
                table: #table,
                key: &__KEY,
                depends: &[#(&#dep_idents),*],
                variants: &[#(#variant_metas),*],
                ttl: #krate::__private::core::time::Duration::from_millis(#ttl_ms),
                columns: &[#(#columns),*],
            };

            #[automatically_derived]
            impl #krate::CachedEntity for #ident {
                const META: &'static #krate::__private::EntityMeta = &__META;

                fn cache_key(&self) -> #krate::Key #render_key

                fn cache_keys(&self) -> ::std::vec::Vec<#krate::Key> {
                    ::std::vec![self.cache_key() #(, #render_deps)*]
                }
            }

            #[automatically_derived]
            impl #ident {
                #[doc = #doc_for]
                pub fn cache_key_for(#(#params),*) -> #krate::Key #render_for
            }

            #keyed

            #(#declared)*

            #krate::__private::inventory::submit! {
                #krate::__private::Registration(&__META)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    fn expanded(input: &str) -> String {
        let input: syn::DeriveInput = syn::parse_str(input).expect("a struct");
        super::derive(&input).to_string()
    }

    #[test]
    fn generated_paths_name_the_runtime_by_the_crate_attribute() {
        let default = expanded(r#"#[cached_entity(key = "p:<id>")] struct P { id: i64 }"#);
        assert!(
            default.contains(":: cache_runtime :: CachedEntity for P"),
            "{default}"
        );

        let renamed =
            expanded(r#"#[cached_entity(crate = "cr", key = "p:<id>")] struct P { id: i64 }"#);
        assert!(renamed.contains("cr :: CachedEntity for P"), "{renamed}");
        assert!(!renamed.contains("cache_runtime"), "{renamed}");

        let nested = expanded(
            r#"#[cached_entity(key = "p:<id>", crate = "::my_lib::cache")] struct P { id: i64 }"#,
        );
        assert!(
            nested.contains(":: my_lib :: cache :: __private :: Registration"),
            "{nested}"
        );
        assert!(!nested.contains("cache_runtime"), "{nested}");
    }

    #[test]
    fn the_fallback_stub_uses_the_crate_attribute_too() {
        let stub =
            expanded(r#"#[cached_entity(crate = "cr", key = "p:<idd>")] struct P { id: i64 }"#);
        assert!(stub.contains("compile_error"), "{stub}");
        assert!(stub.contains("cr :: __private :: FALLBACK_META"), "{stub}");
        assert!(!stub.contains("cache_runtime"), "{stub}");
    }

    #[test]
    fn a_crate_attribute_that_is_not_a_path_is_an_error() {
        for bad in ["", "1 + 2", "cr::", "a b"] {
            let out = expanded(&format!(
                r#"#[cached_entity(crate = "{bad}", key = "p:<id>")] struct P {{ id: i64 }}"#
            ));
            assert!(out.contains("is not a path"), "{bad}: {out}");
            assert!(
                out.contains(":: cache_runtime :: __private :: FALLBACK_META"),
                "{bad}: {out}"
            );
        }
    }
}
