//! Runs the `shop` example (the README's first command) against the real servers and checks its claims, so
//! it cannot rot.

use std::process::Command;

#[test]
fn shop_example_invalidates_every_write_path_and_reads_fresh() {
    let out = Command::new(env!("CARGO_BIN_EXE_shop"))
        .output()
        .expect("run the shop example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "shop failed:\n{stdout}\n{stderr}");
    let step = |n: u32| {
        let start = stdout
            .find(&format!("step {n}:"))
            .unwrap_or_else(|| panic!("no step {n} in:\n{stdout}"));
        let end = stdout[start + 1..]
            .find("\nstep ")
            .map_or(stdout.len(), |e| start + 1 + e);
        &stdout[start..end]
    };
    assert!(step(1).contains(
        "cached now: product:1, product:1:page, product:3:page, category:1:products, category:2:products"
    ));
    // Autocommit UPDATE through the pool: the product, its page, its category's list.
    assert!(step(2).contains("invalidated: product:1, product:1:page, category:1:products"));
    assert!(step(2).contains("price_cents: 3999"));
    // A transaction moving a product: the lists of the old and the new category.
    assert!(step(3).contains("invalidated: category:1:products, category:2:products"));
    assert!(step(3).contains("(2, \"Kitchen lamp\", 8999), (3, \"Kettle\", 2999)"));
    assert!(step(4).contains("invalidated: nothing"));
    // A category rename invalidates the page that joined it, through its tag.
    assert!(step(5).contains("category:1 (tag)"));
    assert!(step(5).contains("category: \"Lighting\""));
    // A plain PgPool: the relay delivers.
    assert!(step(6).contains("the relay invalidated product:3:page"));
    assert!(step(6).contains("invalidated: product:3:page, category:2:products"));
    assert!(!stdout.contains("STALE"), "{stdout}");
    assert!(stdout.contains("every read after every write was fresh."));
}
