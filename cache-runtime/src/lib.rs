#![doc = include_str!("../../README.md")]

mod cache;
pub mod codec;
mod entity;
mod flight;
mod key;
mod registry;
pub mod store;

pub use cache::{Cache, CacheBuilder, LoadOptions, Stats};
pub use cache_derive::{CachedEntity, key};
pub use codec::CodecError;
pub use entity::{CachedEntity, Column, EntityMeta};
pub use key::{
    Key, KeyError, KeyPart, KeyValue, KeyWriter, NULL_RENDERING, PartKind, Segment, Template,
    is_value_char,
};
pub use registry::{Registry, RegistryError, registry};
pub use store::{BoxFuture, MemoryStore, RedisStore, Store, StoreError};

/// Support for generated code; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::key::KeyBuilder;
    pub use crate::registry::Registration;
    pub use core;
    pub use inventory;

    /// A key template, named by the FNV-1a hash of its text (computed by the macros).
    pub struct TemplateId<const HASH: u64>;

    /// Implemented by the derive, for each template an entity declares, so that `key!` can check at compile
    /// time that some entity declares the template it renders.
    #[diagnostic::on_unimplemented(
        message = "no `#[derive(CachedEntity)]` in this build declares this key template",
        label = "undeclared key template",
        note = "a key read from the cache must be declared as `key` or in `depends` of some entity, so that \
                writes invalidate it; check its spelling, including the placeholder names"
    )]
    pub trait Declares<E> {}

    /// Compiles only when some entity declares the template `T` (used by `key!`).
    pub const fn declared<T: Declares<E>, E>() {}

    /// The metadata of an entity whose derive failed; never registered, never read.
    pub const FALLBACK_META: &crate::EntityMeta = &crate::EntityMeta {
        type_name: "",
        table: "",
        key: &FALLBACK_TEMPLATE,
        depends: &[],
        ttl: core::time::Duration::from_secs(1),
        columns: &[],
    };
    static FALLBACK_TEMPLATE: crate::Template = crate::Template::__new("", "", &[]);

    /// The kind of a placeholder's type, at compile time (used by the derive).
    pub const fn kind_of<T: crate::KeyPart + ?Sized>() -> crate::PartKind {
        T::KIND
    }
}
