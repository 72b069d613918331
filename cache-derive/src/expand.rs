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
            let stub = fallback::stub(&input.ident, &input.generics);
            let errors = cx.into_compile_errors();
            quote!(#errors #stub)
        }
    }
}

/// `static`-able tokens for a template: `Template::__new(text, shape, &[segments])`.
pub(crate) fn template_tokens(t: &Template) -> TokenStream {
    let text = &t.text;
    let shape = t.shape();
    let segments = t.segments.iter().map(|s| match s {
        Segment::Lit(text) => quote!(::cache_runtime::Segment::Lit(#text)),
        Segment::Placeholder(name) => quote!(::cache_runtime::Segment::Placeholder(#name)),
    });
    quote!(::cache_runtime::Template::__new(#text, #shape, &[#(#segments),*]))
}

/// Statements that render `t` into a `Key`, taking each placeholder's value from `value(name)`.
pub(crate) fn render_tokens(
    t: &Template,
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
        ::cache_runtime::__private::KeyBuilder::new(#template) #(#steps)* .finish()
    })
}

/// `impl Declares<Entity> for TemplateId<HASH> {}`: lets `key!` check that the template is declared.
fn declares(t: &Template, ident: &syn::Ident) -> TokenStream {
    let id = Literal::u64_suffixed(t.id());
    quote! {
        #[automatically_derived]
        impl ::cache_runtime::__private::Declares<#ident> for ::cache_runtime::__private::TemplateId<#id> {}
    }
}

fn expand(cont: &Container<'_>, checked: &valid::Checked<'_>) -> TokenStream {
    let ident = cont.ident;
    let type_name = ident.to_string();
    let table = &checked.table;
    let ttl_ms = Literal::u64_suffixed(u64::try_from(checked.ttl.as_millis()).unwrap_or(u64::MAX));

    let key_tokens = template_tokens(&checked.key);
    let dep_idents: Vec<_> = (0..checked.depends.len())
        .map(|i| format_ident!("__DEPENDS_{}", i))
        .collect();
    let dep_tokens = checked.depends.iter().map(template_tokens);

    let columns = checked.used.iter().map(|f| {
        let field = unraw(f.ident);
        let column = &f.column;
        let ty = f.ty;
        let kind = quote_spanned!(ty.span()=> ::cache_runtime::__private::kind_of::<#ty>());
        quote!(::cache_runtime::Column { field: #field, column: #column, kind: #kind })
    });

    // Spanned on the field's type, so a type without a key rendering is reported once, there.
    let self_value = |name: &str| match cont.field(name) {
        Some(f) => {
            let id = f.ident;
            quote_spanned!(f.ty.span()=> &self.#id)
        }
        None => quote!(),
    };
    let render_key = render_tokens(&checked.key, &quote!(&__KEY), self_value);
    let render_deps = checked
        .depends
        .iter()
        .zip(&dep_idents)
        .map(|(t, id)| render_tokens(t, &quote!(&#id), self_value));

    let params: Vec<_> = checked
        .key
        .placeholders()
        .filter_map(|name| cont.field(name))
        .map(|f| {
            let (id, ty) = (f.ident, f.ty);
            quote!(#id: &#ty)
        })
        .collect();
    let render_for = render_tokens(&checked.key, &quote!(&__KEY), |name| {
        let id = cont.field(name).map(|f| f.ident);
        quote!(#id)
    });
    let doc_for = format!(
        "The cache key `{}` of the `{type_name}` with these values.",
        checked.key.text
    );

    let mut declared = vec![declares(&checked.key, ident)];
    for t in &checked.depends {
        declared.push(declares(t, ident));
    }

    quote! {
        #[allow(non_upper_case_globals, clippy::all)]
        const _: () = {
            static __KEY: ::cache_runtime::Template = #key_tokens;
            #(static #dep_idents: ::cache_runtime::Template = #dep_tokens;)*
            static __META: ::cache_runtime::EntityMeta = ::cache_runtime::EntityMeta {
                type_name: #type_name,
                table: #table,
                key: &__KEY,
                depends: &[#(&#dep_idents),*],
                ttl: ::cache_runtime::__private::core::time::Duration::from_millis(#ttl_ms),
                columns: &[#(#columns),*],
            };

            #[automatically_derived]
            impl ::cache_runtime::CachedEntity for #ident {
                const META: &'static ::cache_runtime::EntityMeta = &__META;

                fn cache_key(&self) -> ::cache_runtime::Key #render_key

                fn cache_keys(&self) -> ::std::vec::Vec<::cache_runtime::Key> {
                    ::std::vec![self.cache_key() #(, #render_deps)*]
                }
            }

            #[automatically_derived]
            impl #ident {
                #[doc = #doc_for]
                pub fn cache_key_for(#(#params),*) -> ::cache_runtime::Key #render_for
            }

            #(#declared)*

            ::cache_runtime::__private::inventory::submit! {
                ::cache_runtime::__private::Registration(&__META)
            }
        };
    }
}
