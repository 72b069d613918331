//! Entities shared by the test binaries (a separate crate from the tests, so `key!` is exercised across
//! crates).

use cache_runtime::CachedEntity;

/// A category row.
#[derive(Debug, Clone, PartialEq, CachedEntity, sqlx::FromRow)]
#[cached_entity(table = "categories", key = "category:<id>", depends = ["category:<id>:products"])]
pub struct Category {
    /// Primary key.
    pub id: i64,
    /// Display name.
    pub name: String,
}

/// A product row.
#[derive(Debug, Clone, PartialEq, CachedEntity, sqlx::FromRow)]
#[cached_entity(key = "product:<id>", depends = ["category:<category_id>:products"], ttl = "10m")]
pub struct Product {
    /// Primary key.
    pub id: i64,
    /// The category it is listed in.
    pub category_id: i64,
    /// Display name.
    pub name: String,
    /// Price in cents.
    pub price_cents: i64,
}

/// A user, keyed by a text handle and scoped by tenant: exercises text, bool and nullable placeholders.
#[derive(Debug, Clone, PartialEq, CachedEntity, sqlx::FromRow)]
#[cached_entity(
    table = "app_users",
    key = "tenant:<tenant>:user:<handle>",
    depends = ["team:<team_id>:members", "admins:<is_admin>"],
    ttl = "1h30m"
)]
pub struct User {
    /// Tenant scope.
    pub tenant: String,
    /// The user's handle, unique per tenant.
    pub handle: String,
    /// The team, if any.
    #[sqlx(rename = "team")]
    pub team_id: Option<i32>,
    /// Whether the user is an administrator.
    pub is_admin: bool,
}
