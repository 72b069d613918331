//! What `#[derive(CachedEntity)]` and `key!` must accept, compiled as ordinary code (formerly trybuild pass
//! cases): every supported placeholder type, renames, hygiene, identical templates on two entities, and
//! `crate = "…"`. What they must reject is in the `compile-fail` package.

/// Every supported placeholder type, `sqlx` renames, raw identifiers and the user's short form.
mod entities {
    use cache_runtime::{CachedEntity, key};

    #[derive(CachedEntity, sqlx::FromRow)]
    #[cached_entity(
        key = "thing:<id>",
        depends = ["small:<small>", "u:<unsigned>", "flag:<flag>", "name:<name>", "opt:<maybe>", "kind:<type>"]
    )]
    #[derive(Debug)]
    pub struct Thing {
        id: i64,
        small: i16,
        unsigned: u32,
        flag: bool,
        #[sqlx(rename = "display_name")]
        name: String,
        maybe: Option<String>,
        r#type: String,
        /// Not a placeholder: any type is fine.
        #[allow(dead_code)]
        ignored: f64,
    }

    #[derive(CachedEntity)]
    #[cached_entity(key = "product:<id>", depends = ["category:<category_id>:products"])]
    struct Product {
        id: i64,
        category_id: i64,
    }

    #[derive(CachedEntity, sqlx::FromRow)]
    #[sqlx(rename_all = "camelCase")]
    #[cached_entity(table = "legacy", key = "legacy:<legacy_id>:<owner_name>")]
    struct Legacy {
        legacy_id: i64,
        #[sqlx(rename = "OWNER")]
        owner_name: String,
    }

    #[test]
    fn columns_follow_sqlx_renames() {
        let cols: Vec<_> = Legacy::META.columns.iter().map(|c| c.column).collect();
        assert_eq!(cols, ["legacyId", "OWNER"]);
        assert_eq!(Legacy::META.table, "legacy");
        assert_eq!(Thing::META.table, "things");
        assert_eq!(
            Thing::META.column("name").map(|c| c.column),
            Some("display_name")
        );
        assert_eq!(Thing::META.column("type").map(|c| c.column), Some("type"));
        assert_eq!(Product::META.ttl.as_secs(), 3600, "default TTL");
    }

    #[test]
    fn every_placeholder_type_renders() {
        let k = key!("kind:<type>", type = "a b");
        assert_eq!(k.as_str(), "kind:a%20b");
        let p = Product {
            id: 1,
            category_id: 2,
        };
        assert_eq!(
            p.cache_keys()[1],
            key!("category:<category_id>:products", category_id = 2)
        );
        let t = Thing {
            id: 1,
            small: -2,
            unsigned: 3,
            flag: false,
            name: "n".into(),
            maybe: None,
            r#type: "t".into(),
            ignored: 0.5,
        };
        let keys: Vec<String> = t
            .cache_keys()
            .into_iter()
            .map(|k| k.into_string())
            .collect();
        assert_eq!(
            keys,
            [
                "thing:1",
                "small:-2",
                "u:3",
                "flag:false",
                "name:n",
                "opt:~",
                "kind:t"
            ]
        );
        let l = Legacy {
            legacy_id: 4,
            owner_name: "o:w".into(),
        };
        assert_eq!(l.cache_key().as_str(), "legacy:4:o%3Aw");
    }
}

/// Generated code uses absolute paths only: local items named like the ones it uses do not break it.
#[allow(dead_code, non_camel_case_types, clippy::upper_case_acronyms)]
mod hygiene {
    mod core {}
    mod std {}
    mod alloc {}
    mod cache_runtime {}
    mod inventory {}
    struct Key;
    struct Template;
    struct Segment;
    struct EntityMeta;
    struct Column;
    struct Duration;
    struct Vec;
    struct Option;
    struct Some;
    struct None;
    struct Result;
    struct Ok;
    struct Err;
    struct String;
    struct Box;
    struct __KEY;
    struct __META;
    struct __DEPENDS_0;
    struct __TEMPLATE;
    struct __builder;

    #[derive(::cache_runtime::CachedEntity)]
    #[cached_entity(key = "hygiene:<id>", depends = ["hygiene:<id>:list"])]
    struct Hygiene {
        id: i64,
    }

    #[test]
    fn generated_code_ignores_local_names() {
        use ::cache_runtime::CachedEntity as _;
        let h = Hygiene { id: 1 };
        ::std::assert_eq!(h.cache_keys().len(), 2);
        let k = ::cache_runtime::key!("hygiene:<id>:list", id = 1);
        ::std::assert_eq!(k.as_str(), "hygiene:1:list");
        ::std::assert_eq!(h.cache_keys()[1], k);
    }
}

/// Two entities declare the identical template text: `Entity =>` says which declaration `key!` checks.
mod same_template {
    use cache_runtime::{CachedEntity, key};

    #[derive(CachedEntity)]
    #[cached_entity(key = "a:<id>", depends = ["shared:<cid>"])]
    struct A {
        id: i64,
        cid: i64,
    }

    #[derive(CachedEntity)]
    #[cached_entity(key = "b:<id>", depends = ["shared:<cid>"])]
    struct B {
        id: i64,
        cid: i64,
    }

    #[test]
    fn entity_paths_choose_the_declaration() {
        let a = key!(A => "shared:<cid>", cid = 1);
        let b = key!(crate::same_template::B => "shared:<cid>", cid = 1);
        assert_eq!(a, b);
        assert_eq!(key!(A => "a:<id>", id = 2).as_str(), "a:2");
        assert_eq!(A { id: 2, cid: 1 }.cache_keys()[1], a);
        assert_eq!(B { id: 3, cid: 1 }.cache_keys()[1], b);
    }
}

/// `crate = "…"`: the user names the runtime by another path (a renamed import, a facade's re-export).
mod crate_path {
    use cache_runtime as cr;
    use cr::CachedEntity as _;

    #[derive(cr::CachedEntity)]
    #[cached_entity(crate = "cr", key = "renamed:<id>", depends = ["renamed:<id>:list"])]
    struct Renamed {
        id: i64,
    }

    /// A crate that re-exports the runtime, as a facade would.
    mod facade {
        pub(super) use ::cache_runtime as runtime;
    }

    #[derive(facade::runtime::CachedEntity)]
    #[cached_entity(key = "facade:<name>", crate = "facade::runtime")]
    struct ThroughFacade {
        name: String,
    }

    #[test]
    fn the_generated_code_uses_the_given_path() {
        let keys: Vec<String> = Renamed { id: 5 }
            .cache_keys()
            .into_iter()
            .map(cr::Key::into_string)
            .collect();
        assert_eq!(keys, ["renamed:5", "renamed:5:list"]);
        assert_eq!(Renamed::cache_key_for(&5), cr::key!("renamed:<id>", id = 5));
        assert_eq!(Renamed::META.table, "renameds");
        let f = ThroughFacade { name: "x y".into() };
        assert_eq!(f.cache_key().as_str(), "facade:x%20y");
        assert!(
            cr::registry()
                .entities()
                .iter()
                .any(|e| e.type_name == "ThroughFacade")
        );
    }
}
