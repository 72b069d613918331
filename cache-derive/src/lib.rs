//! Derive macros of `cache-runtime`: `#[derive(CachedEntity)]` and the compile-time checked `key!`.
//!
//! Use them through `cache-runtime`, which re-exports both and documents them; this crate's generated code
//! refers to `::cache_runtime` only, or to the path given by `#[cached_entity(crate = "…")]` (as serde's
//! `#[serde(crate = "…")]`: for a crate that renames the dependency or re-exports `cache_runtime`).

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
/// See `cache_runtime::CachedEntity` for the attribute and what is generated. Besides `table`, `key`,
/// `depends`, `variants`, `ttl` and `refresh`, the attribute takes `crate = "path"`: the path by which the deriving crate sees
/// `cache_runtime` (default `::cache_runtime`), used by every path of the generated code.
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
