//! The stub emitted beside compile errors (thiserror's `fallback.rs`): the type still implements
//! `CachedEntity`, so one mistake in the attribute does not cascade into errors at every use of the entity.

use proc_macro2::TokenStream;
use quote::quote;

pub(crate) fn stub(ident: &syn::Ident, generics: &syn::Generics, krate: &syn::Path) -> TokenStream {
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    quote! {
        #[allow(unreachable_code, clippy::all)]
        const _: () = {
            #[automatically_derived]
            impl #impl_generics #krate::CachedEntity for #ident #ty_generics #where_clause {
                const META: &'static #krate::__private::EntityMeta = #krate::__private::FALLBACK_META;
                fn cache_key(&self) -> #krate::Key {
                    ::core::unreachable!()
                }
                fn cache_keys(&self) -> ::std::vec::Vec<#krate::Key> {
                    ::core::unreachable!()
                }
            }
        };
    }
}
