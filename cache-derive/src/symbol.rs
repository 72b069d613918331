//! Names of the attribute keys.

pub(crate) const CACHED_ENTITY: &str = "cached_entity";
pub(crate) const TABLE: &str = "table";
pub(crate) const KEY: &str = "key";
pub(crate) const DEPENDS: &str = "depends";
pub(crate) const TTL: &str = "ttl";
pub(crate) const VARIANTS: &str = "variants";
/// `refresh = "30s"`: reload hot keys after a write instead of leaving them empty.
pub(crate) const REFRESH: &str = "refresh";
/// The path of `cache_runtime` in generated code, like serde's `#[serde(crate = "…")]`.
pub(crate) const CRATE: &str = "crate";
pub(crate) const ALL: &[&str] = &[TABLE, KEY, DEPENDS, VARIANTS, TTL, REFRESH, CRATE];
pub(crate) const SQLX: &str = "sqlx";
pub(crate) const RENAME: &str = "rename";
pub(crate) const RENAME_ALL: &str = "rename_all";
