//! The derive and `key!` across crates: the entities live in the `tests` library crate, the reads here.

use cache_runtime::key::{KeyValue, PartKind, Segment};
use cache_runtime::{CachedEntity, key, registry};
use tests::model::{Category, Product, User};

#[test]
fn read_side_keys_match_what_writes_invalidate() {
    let p = Product {
        id: 7,
        category_id: 3,
        name: "lamp".into(),
        price_cents: 100,
    };
    let written: Vec<String> = p
        .cache_keys()
        .into_iter()
        .map(|k| k.into_string())
        .collect();
    assert_eq!(written, ["product:7", "category:3:products"]);

    // Read sites in another crate render the same keys, from templates checked at compile time.
    assert_eq!(key!("product:<id>", id = 7).as_str(), written[0]);
    let category_id = 3;
    assert_eq!(
        key!("category:<category_id>:products", category_id).as_str(),
        written[1]
    );
    // Category declares the same shape with another placeholder name: same key.
    assert_eq!(
        key!("category:<id>:products", id = 3_i64).as_str(),
        written[1]
    );
    assert_eq!(Product::cache_key_for(&7), p.cache_key());
}

#[test]
fn text_bool_and_null_placeholders_render_canonically() {
    let u = User {
        tenant: "acme corp".into(),
        handle: "a:b/ü".into(),
        team_id: None,
        is_admin: true,
    };
    let keys: Vec<String> = u
        .cache_keys()
        .into_iter()
        .map(|k| k.into_string())
        .collect();
    assert_eq!(
        keys,
        [
            "tenant:acme%20corp:user:a%3Ab%2F%C3%BC",
            "team:~:members",
            "admins:true"
        ]
    );
    let k = key!(
        "tenant:<tenant>:user:<handle>",
        tenant = "acme corp",
        handle = "a:b/ü"
    );
    assert_eq!(k.as_str(), keys[0]);
    assert_eq!(
        k.template().parse(k.as_str()),
        Some(vec![Some("acme corp".into()), Some("a:b/ü".into())])
    );
    assert_eq!(
        key!("team:<team_id>:members", team_id = Some(4)).as_str(),
        "team:4:members"
    );
    // A value that tries to impersonate another user's key stays inside its placeholder.
    let sneaky = key!(
        "tenant:<tenant>:user:<handle>",
        tenant = "x:user:admin",
        handle = "y"
    );
    assert_eq!(sneaky.as_str(), "tenant:x%3Auser%3Aadmin:user:y");
}

#[test]
fn metadata_is_static_and_complete() {
    let meta = User::META;
    assert_eq!(meta.type_name, "User");
    assert_eq!(meta.table, "app_users");
    assert_eq!(meta.ttl.as_secs(), 5400);
    assert_eq!(
        meta.key.segments(),
        &[
            Segment::Lit("tenant:"),
            Segment::Placeholder("tenant"),
            Segment::Lit(":user:"),
            Segment::Placeholder("handle"),
        ]
    );
    let columns: Vec<_> = meta
        .columns
        .iter()
        .map(|c| (c.field, c.column, c.kind))
        .collect();
    assert_eq!(
        columns,
        [
            ("tenant", "tenant", PartKind::Text),
            ("handle", "handle", PartKind::Text),
            ("team_id", "team", PartKind::Int),
            ("is_admin", "is_admin", PartKind::Bool),
        ]
    );
    assert_eq!(
        Product::META.table,
        "products",
        "default table: snake_case + s"
    );
    assert_eq!(
        Category::META.depends[0].shape(),
        Product::META.depends[0].shape()
    );
}

#[test]
fn the_registry_lists_every_entity_and_validates() {
    let tables: Vec<_> = registry().entities().iter().map(|e| e.table).collect();
    assert_eq!(tables, ["app_users", "categories", "products"]);
    registry()
        .validate()
        .expect("the shared model is consistent");
    // A snapshot, not a tautology: the fingerprint is what an installed database records of the triggers it
    // runs. Changing this literal means every installed database must re-install its triggers, so it must be
    // a deliberate change (of the shared model, or of what the fingerprint covers), never a side effect.
    assert_eq!(registry().fingerprint(), "c7ad8b282b8f7b1e");
}

mod fixed {
    use std::time::Duration;

    use cache_runtime::Registry;
    use cache_runtime::entity::{Column, EntityMeta};
    use cache_runtime::key::{PartKind, Segment, Template};

    static ITEM_KEY: Template = Template::__new(
        "item:<id>",
        "item:<>",
        &[Segment::Lit("item:"), Segment::Placeholder("id")],
    );
    static ITEM_SHELF: Template = Template::__new(
        "shelf:<shelf_id>:items",
        "shelf:<>:items",
        &[
            Segment::Lit("shelf:"),
            Segment::Placeholder("shelf_id"),
            Segment::Lit(":items"),
        ],
    );
    static TAG_KEY: Template = Template::__new(
        "tag:<name>:<active>",
        "tag:<>:<>",
        &[
            Segment::Lit("tag:"),
            Segment::Placeholder("name"),
            Segment::Lit(":"),
            Segment::Placeholder("active"),
        ],
    );

    const ITEM_COLUMNS: &[Column] = &[
        Column {
            field: "id",
            column: "id",
            kind: PartKind::Int,
        },
        Column {
            field: "shelf_id",
            column: "shelf",
            kind: PartKind::Int,
        },
    ];

    static ITEM: EntityMeta = EntityMeta {
        type_name: "Item",
        table: "items",
        key: &ITEM_KEY,
        depends: &[&ITEM_SHELF],
        variants: &[],
        ttl: Duration::from_secs(60),
        columns: ITEM_COLUMNS,
    };
    static TAG: EntityMeta = EntityMeta {
        type_name: "Tag",
        table: "tags",
        key: &TAG_KEY,
        depends: &[],
        variants: &[],
        ttl: Duration::from_secs(60),
        columns: &[
            Column {
                field: "name",
                column: "label",
                kind: PartKind::Text,
            },
            Column {
                field: "active",
                column: "active",
                kind: PartKind::Bool,
            },
        ],
    };
    /// `ITEM` under another type name and TTL: nothing the triggers are generated from.
    static ITEM_RENAMED: EntityMeta = EntityMeta {
        type_name: "Article",
        ttl: Duration::from_secs(5),
        ..ITEM
    };
    /// `ITEM` with its `shelf` column read as text: other triggers.
    static ITEM_TEXT_SHELF: EntityMeta = EntityMeta {
        columns: &[
            Column {
                field: "id",
                column: "id",
                kind: PartKind::Int,
            },
            Column {
                field: "shelf_id",
                column: "shelf",
                kind: PartKind::Text,
            },
        ],
        ..ITEM
    };

    #[test]
    fn the_fingerprint_of_fixed_entities_is_pinned() {
        // Snapshots, each checked once against FNV-1a 64 of the canonical text computed outside Rust.
        // Changing one means every installed database must re-install its triggers: a deliberate change only.
        assert_eq!(
            Registry::new([&ITEM, &TAG]).fingerprint(),
            "f992ae47e3aba0ae"
        );
        assert_eq!(
            Registry::new([]).fingerprint(),
            "cbf29ce484222325",
            "FNV-1a offset basis"
        );
    }

    #[test]
    fn the_fingerprint_covers_what_the_triggers_are_generated_from() {
        let base = Registry::new([&ITEM, &TAG]).fingerprint();
        assert_eq!(
            Registry::new([&TAG, &ITEM]).fingerprint(),
            base,
            "order of registration"
        );
        assert_eq!(
            Registry::new([&ITEM_RENAMED, &TAG]).fingerprint(),
            base,
            "type name and TTL are not in the triggers"
        );
        assert_ne!(
            Registry::new([&ITEM_TEXT_SHELF, &TAG]).fingerprint(),
            base,
            "a column's kind is"
        );
        assert_ne!(Registry::new([&ITEM]).fingerprint(), base, "a table is");
    }
}

#[test]
fn dynamic_rendering_matches_generated_code() {
    let key = Product::META
        .key
        .render(&[KeyValue::Int(-12)])
        .expect("one placeholder");
    assert_eq!(key, Product::cache_key_for(&-12));
}

#[test]
fn uuids_render_as_lowercase_hyphenated_text() {
    let id = uuid::Uuid::from_u128(0x67E5_5044_10B1_426F_9247_BB68_0E5F_E0C8);
    let k = key!("product:<id>", id = id);
    assert_eq!(k.as_str(), "product:67e55044-10b1-426f-9247-bb680e5fe0c8");
    assert_eq!(<uuid::Uuid as cache_runtime::KeyPart>::KIND, PartKind::Text);
}

/// The generated install scripts, pinned: a change of the SQL (triggers, functions, object names, the
/// rendering expressions) must be a deliberate one, seen in review as a diff of `tests/snapshots/`.
/// Regenerate with `UPDATE_SNAPSHOTS=1 cargo test -p tests --test keys` and read the diff.
mod schema_snapshots {
    use cache_runtime::backend::postgres::PgSchema;
    use cache_runtime::backend::sqlite::SqliteSchema;
    use cache_runtime::registry;

    fn check(name: &str, actual: &str) {
        let path = format!("{}/snapshots/{name}", env!("CARGO_MANIFEST_DIR"));
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(&path, actual).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("cannot read {path} ({e}); create it with UPDATE_SNAPSHOTS=1")
        });
        if expected != actual {
            let line = expected
                .lines()
                .zip(actual.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
            panic!(
                "{name} differs from the generated SQL from line {} on:\n  snapshot:  {:?}\n  generated: {:?}\n\
                 If the change is deliberate, regenerate with UPDATE_SNAPSHOTS=1 and review the diff.",
                line + 1,
                expected.lines().nth(line),
                actual.lines().nth(line),
            );
        }
    }

    #[test]
    fn postgres_statement_triggers() {
        check("postgres_statement.sql", &PgSchema::new(registry()).sql());
    }

    #[test]
    fn postgres_row_triggers() {
        let schema =
            PgSchema::new(registry()).trigger_mode(cache_runtime::backend::TriggerMode::Row);
        check("postgres_row.sql", &schema.sql());
    }

    #[test]
    fn sqlite_triggers() {
        check("sqlite.sql", &SqliteSchema::new(registry()).sql());
    }

    #[test]
    fn postgres_grants() {
        check("postgres_grant.sql", &PgSchema::grant_sql("app role"));
    }
}
