//! Startup validation of the registry: entities that contradict each other are one clear error.

use cache_runtime::{CachedEntity, Registry, registry};

/// Maps `orders` with one set of templates...
#[derive(Debug, CachedEntity)]
#[cached_entity(table = "orders", key = "order:<id>")]
pub struct Order {
    id: i64,
}

/// ...and this one maps `orders` with another.
#[derive(Debug, CachedEntity)]
#[cached_entity(table = "orders", key = "order:<id>", depends = ["customer:<customer_id>:orders"])]
pub struct OrderSummary {
    id: i64,
    customer_id: i64,
}

/// Owns the key shape `invoice:<>`...
#[derive(Debug, CachedEntity)]
#[cached_entity(table = "invoices", key = "invoice:<id>")]
pub struct Invoice {
    id: i64,
}

/// ...which another table's entity claims too.
#[derive(Debug, CachedEntity)]
#[cached_entity(table = "legacy_invoices", key = "invoice:<number>")]
pub struct LegacyInvoice {
    number: String,
}

/// Same table and templates as `Invoice`: not a conflict.
#[derive(Debug, CachedEntity)]
#[cached_entity(table = "invoices", key = "invoice:<id>")]
pub struct InvoiceRow {
    id: i64,
}

#[test]
fn conflicts_are_reported_together_with_what_to_do() {
    let err = registry().validate().expect_err("two conflicts");
    assert_eq!(err.conflicts.len(), 2, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("`Order` and `OrderSummary` both map table `orders`"),
        "{text}"
    );
    assert!(
        text.contains("`Invoice` (table `invoices`) and `LegacyInvoice` (table `legacy_invoices`) both own the key template `invoice:<>`")
            || text.contains("`InvoiceRow` (table `invoices`) and `LegacyInvoice` (table `legacy_invoices`)"),
        "{text}"
    );
}

#[test]
fn a_consistent_subset_validates() {
    Registry::new([Order::META, Invoice::META, InvoiceRow::META])
        .validate()
        .expect("consistent");
    assert!(
        Registry::new([Order::META, OrderSummary::META])
            .validate()
            .is_err()
    );
}

#[test]
fn the_fingerprint_changes_with_the_templates() {
    let a = Registry::new([Order::META]).fingerprint();
    let b = Registry::new([OrderSummary::META]).fingerprint();
    assert_ne!(a, b);
    assert_eq!(a, Registry::new([Order::META]).fingerprint());
    // Two entities with identical capture metadata fingerprint alike.
    let one = Registry::new([Invoice::META]).fingerprint();
    let two = Registry::new([InvoiceRow::META]).fingerprint();
    assert_eq!(one, two);
}
