//! Derive macros of `cache-runtime`: `#[derive(CachedEntity)]` and the compile-time checked `key!`.
//!
//! Use them through `cache-runtime`, which re-exports both and documents them; this crate's generated code
//! refers to `::cache_runtime` only.

mod ast;
mod attr;
mod ctxt;
mod expand;
mod fallback;
mod key_macro;
mod symbol;
mod valid;

use proc_macro::TokenStream;

/// Implements `cache_runtime::CachedEntity` and registers the entity's templates.
///
/// See `cache_runtime::CachedEntity` for the attribute and what is generated.
#[proc_macro_derive(CachedEntity, attributes(cached_entity))]
pub fn derive_cached_entity(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    expand::derive(&input).into()
}

/// Renders a cache key from a template that some `#[derive(CachedEntity)]` declares.
///
/// See `cache_runtime::key!`.
#[proc_macro]
pub fn key(input: TokenStream) -> TokenStream {
    key_macro::expand(input.into()).into()
}
