#![doc = include_str!("../../README.md")]

mod acknowledged;
pub mod backend;
pub mod cache;
mod consumer;
pub mod entity;
pub mod environment;
pub mod error;
pub mod health;
pub mod key;
#[cfg(feature = "tower")]
pub mod layer;
pub mod observe;
pub mod outbox;
pub mod pool;
mod recent;
pub mod refresh;
pub mod registry;
pub mod store;
pub mod token;

/// Derives [`CachedEntity`](trait@CachedEntity) for a struct that maps a table row.
///
/// ```text
/// #[cached_entity(
///     table = "products",                            // optional: snake_case struct name + "s"
///     key = "product:<id>",                          // required: the row's own key
///     depends = ["category:<category_id>:products"], // optional: keys derived from the row
///     variants = ["product:<id>:in:<currency>"],     // optional: a template above + request parameters
///     ttl = "10m",                                   // optional (default 1h): ms, s, m, h, d, e.g. "1h30m"
///     refresh = "30s",                               // optional: reload keys read within 30 s after a write
/// )]
/// ```
///
/// Placeholders name fields of the struct; their column is the field name or its `#[sqlx(rename = "…")]`.
/// A *variant* extends the key or a `depends` template (its base) with placeholders that are request
/// parameters rather than fields (a viewer, a page, a currency): `key!` renders it, and its entries are
/// invalidated whenever their base key is, in one store operation (see [`entity::Variant`]).
/// A placeholder's type must implement [`KeyPart`]. Every mistake is a compile error with a span and a
/// message that says what to do, all of them at once.
///
/// Generated: `impl CachedEntity` (static [`EntityMeta`](entity::EntityMeta), `cache_key`, `cache_keys`), an inherent
/// `cache_key_for(&field, …) -> Key` taking the key's placeholder values in order, the declarations `key!`
/// checks, and the registration in [`registry()`].
///
/// With `crate = "path"` the generated code names the runtime by `path` instead of `::cache_runtime` (for
/// a renamed dependency or a re-export), as `#[serde(crate = "...")]` does.
///
/// # Examples
///
/// ```
/// use cache_runtime::CachedEntity;
///
/// #[derive(CachedEntity)]
/// #[cached_entity(key = "order:<id>", depends = ["customer:<customer_id>:orders"], ttl = "5m")]
/// struct Order {
///     id: i64,
///     customer_id: i64,
///     total_cents: i64,
/// }
///
/// assert_eq!(Order::META.table, "orders");
/// assert_eq!(Order::cache_key_for(&9).as_str(), "order:9");
/// ```
pub use cache_derive::CachedEntity;

pub use cache::{Cache, LoadOptions};
/// Renders a [`Key`] from a template that some `#[derive(CachedEntity)]` declares.
///
/// `key!("template", name = value, …)`: every placeholder gets exactly one value (`name` alone means
/// `name = name`); values are evaluated once, in template order, and rendered with [`KeyPart`]. It is a
/// compile error when a value is missing, unknown or repeated, when the template is malformed, and when no
/// entity in the build (this crate or any dependency) declares the template as its `key` or in `depends`:
/// a key nobody declares is a key no write would ever invalidate.
///
/// When two entities declare the identical template text, name the one to check:
/// `key!(Product => "template", …)` (without it, the compiler reports "type annotations needed").
///
/// # Examples
///
/// ```
/// use cache_runtime::{CachedEntity, key};
///
/// #[derive(CachedEntity)]
/// #[cached_entity(key = "product:<id>", depends = ["category:<category_id>:products"])]
/// struct Product {
///     id: i64,
///     category_id: i64,
/// }
///
/// let category_id = 5;
/// assert_eq!(key!("category:<category_id>:products", category_id).as_str(), "category:5:products");
/// assert_eq!(key!(Product => "product:<id>", id = 7).as_str(), "product:7");
/// ```
///
/// ```compile_fail
/// # use cache_runtime::{CachedEntity, key};
/// # #[derive(CachedEntity)]
/// # #[cached_entity(key = "product:<id>")]
/// # struct Product { id: i64 }
/// // Declared nowhere: "products" vs "product".
/// let k = key!("products:<id>", id = 7);
/// ```
pub use cache_derive::key;
pub use entity::{CachedEntity, KeyedEntity};
pub use error::Error;
pub use key::{Key, KeyPart};
#[cfg(feature = "sqlite")]
pub use pool::CachedSqlitePool;
pub use pool::{CachedPgPool, CachedPool, CachedPoolOptions, CachedTransaction, WriteDetection};
pub use registry::{Registry, registry};
#[cfg(feature = "cluster")]
pub use store::RedisClusterStore;
pub use store::{MemoryStore, RedisStore, Store, StoreError, TieredStore};

/// Support for generated code; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::entity::{Column, EntityMeta, Variant};
    pub use crate::key::{KeyBuilder, Segment, Template};
    pub use crate::registry::Registration;
    pub use core;
    pub use inventory;
    pub use sqlx;

    /// A key template, named by the FNV-1a hash of its text (computed by the macros).
    #[derive(Debug)]
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
    pub const FALLBACK_META: &crate::entity::EntityMeta = &crate::entity::EntityMeta {
        type_name: "",
        table: "",
        key: &FALLBACK_TEMPLATE,
        depends: &[],
        variants: &[],
        ttl: core::time::Duration::from_secs(1),
        columns: &[],
    };
    /// The value of a `key!` that failed to compile; never reached at run time.
    pub fn fallback_key() -> crate::Key {
        KeyBuilder::new(&FALLBACK_TEMPLATE).finish()
    }
    static FALLBACK_TEMPLATE: crate::key::Template = crate::key::Template::__new("", "", &[]);

    /// The kind of a placeholder's type, at compile time (used by the derive).
    pub const fn kind_of<T: crate::KeyPart + ?Sized>() -> crate::key::PartKind {
        T::KIND
    }
}
