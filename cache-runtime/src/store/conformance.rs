//! A conformance suite for [`Store`] implementations: the primitives the read protocol builds on, checked
//! against a real store. [`MemoryStore`](super::MemoryStore) runs it in its unit tests, [`RedisStore`](super::RedisStore)
//! against a real server in the integration tests; run it on your own store too.
//!
//! # Examples
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use cache_runtime::MemoryStore;
//! use cache_runtime::store::conformance;
//!
//! conformance::check(&MemoryStore::default(), "doc:").await.expect("conforms");
//! # }
//! ```

use std::time::Duration;

use super::{LeaseRequest, Slot, Store, StoreError};

/// A rule the store broke, or a store error.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    /// The store answered, but not as the protocol requires.
    #[error("store does not conform: {0}")]
    Rule(String),
    /// A store call failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn ensure(ok: bool, rule: &str) -> Result<(), Violation> {
    if ok {
        Ok(())
    } else {
        Err(Violation::Rule(rule.to_owned()))
    }
}

fn lease(token: &str) -> LeaseRequest<'_> {
    LeaseRequest {
        token,
        ttl: Duration::from_secs(5),
        replace: None,
    }
}

/// Checks the primitives on keys starting with `prefix` (which must not hold data): leases are exclusive,
/// a fill needs the lease, invalidation removes value and lease, a lease can replace exactly the entry it
/// names, peeks ignore leases, tag tokens are stable until invalidated, and a shape's invalidation
/// removes only its own token.
///
/// # Errors
///
/// The first [`Violation`] found.
///
/// # Cancel safety
///
/// Dropping the future leaves test keys behind (they expire within seconds).
pub async fn check(store: &dyn Store, prefix: &str) -> Result<(), Violation> {
    leases(store, &format!("{prefix}lease")).await?;
    replacement(store, &format!("{prefix}replace")).await?;
    tags(store, prefix).await
}

async fn leases(store: &dyn Store, k: &str) -> Result<(), Violation> {
    let ttl = Duration::from_secs(5);
    let got = store.lookup(k, lease("a"), &[], ttl).await?;
    ensure(
        matches!(got.slot, Slot::Acquired { .. }),
        "an empty slot gives the lease",
    )?;
    let got = store.lookup(k, lease("b"), &[], ttl).await?;
    ensure(got.slot == Slot::Leased, "a held lease is exclusive")?;
    ensure(
        store.peek(k, &[]).await?.value.is_none(),
        "a peek does not return a lease",
    )?;
    ensure(
        !store.fill(k, "b", b"x", ttl).await?,
        "a fill needs the lease",
    )?;
    store.invalidate(&[k.to_owned()]).await?;
    ensure(
        !store.fill(k, "a", b"x", ttl).await?,
        "invalidation removes the lease",
    )?;
    let got = store.lookup(k, lease("c"), &[], ttl).await?;
    ensure(
        matches!(got.slot, Slot::Acquired { .. }),
        "the lease is free again",
    )?;
    ensure(
        store.fill(k, "c", b"x", ttl).await?,
        "the lease holder fills",
    )?;
    let got = store.lookup(k, lease("d"), &[], ttl).await?;
    ensure(
        got.slot == Slot::Value(b"x".to_vec()),
        "a filled slot holds the value",
    )?;
    ensure(
        store.peek(k, &[]).await?.value.as_deref() == Some(b"x"),
        "a peek returns the value",
    )?;
    store.invalidate(&[k.to_owned()]).await?;
    ensure(
        store.peek(k, &[]).await?.value.is_none(),
        "invalidation removes the value",
    )?;
    let got = store.lookup(k, lease("e"), &[], ttl).await?;
    ensure(
        matches!(got.slot, Slot::Acquired { .. }),
        "leased after invalidation",
    )?;
    store.release(k, "other").await?;
    ensure(
        store.lookup(k, lease("f"), &[], ttl).await?.slot == Slot::Leased,
        "release needs the lease",
    )?;
    store.release(k, "e").await?;
    let got = store.lookup(k, lease("g"), &[], ttl).await?;
    ensure(
        matches!(got.slot, Slot::Acquired { .. }),
        "a released lease is free",
    )?;
    store.invalidate(&[k.to_owned()]).await?;
    Ok(())
}

async fn replacement(store: &dyn Store, k: &str) -> Result<(), Violation> {
    let ttl = Duration::from_secs(5);
    store.lookup(k, lease("a"), &[], ttl).await?;
    store.fill(k, "a", b"old", ttl).await?;
    let other = LeaseRequest {
        replace: Some(b"other"),
        ..lease("b")
    };
    let got = store.lookup(k, other, &[], ttl).await?;
    ensure(
        got.slot == Slot::Value(b"old".to_vec()),
        "a lease replaces only the entry it names",
    )?;
    let named = LeaseRequest {
        replace: Some(b"old"),
        ..lease("c")
    };
    let got = store.lookup(k, named, &[], ttl).await?;
    ensure(
        matches!(got.slot, Slot::Acquired { .. }),
        "a lease replaces the entry it names",
    )?;
    store.invalidate(&[k.to_owned()]).await?;
    Ok(())
}

async fn tags(store: &dyn Store, prefix: &str) -> Result<(), Violation> {
    let ttl = Duration::from_secs(5);
    let tags = [format!("{prefix}a:1"), format!("{prefix}a:<>")];
    ensure(
        store.tags(&tags, None).await? == [None, None],
        "tokens start missing",
    )?;
    let first = store.tags(&tags, Some(ttl)).await?;
    ensure(
        first.iter().all(Option::is_some),
        "tokens are created on demand",
    )?;
    ensure(store.tags(&tags, None).await? == first, "tokens are stable")?;
    let k = format!("{prefix}tagged");
    let got = store.lookup(&k, lease("a"), &tags, ttl).await?;
    let created: Vec<_> = got.tags.into_iter().map(Some).collect();
    ensure(created == first, "a lookup returns the current tokens")?;
    ensure(
        store.peek(&k, &tags).await?.tags == first,
        "a peek returns the current tokens",
    )?;
    store.invalidate(&[tags[1].clone()]).await?;
    let after = store.tags(&tags, None).await?;
    ensure(
        after[0] == first[0] && after[1].is_none(),
        "a shape's invalidation removes its token only",
    )?;
    store.invalidate(&[tags[0].clone(), k]).await?;
    ensure(
        store.tags(&tags, None).await? == [None, None],
        "a key's invalidation removes its token",
    )?;
    Ok(())
}
