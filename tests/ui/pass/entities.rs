use cache_runtime::{CachedEntity, key};

/// Every supported placeholder type, `sqlx` renames, raw identifiers and the user's short form.
#[derive(CachedEntity, sqlx::FromRow)]
#[cached_entity(
    key = "thing:<id>",
    depends = ["small:<small>", "u:<unsigned>", "flag:<flag>", "name:<name>", "opt:<maybe>", "kind:<type>"]
)]
pub struct Thing {
    id: i64,
    small: i16,
    unsigned: u32,
    flag: bool,
    #[sqlx(rename = "display_name")]
    name: String,
    maybe: Option<String>,
    r#type: String,
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

fn main() {
    let cols: Vec<_> = Legacy::META.columns.iter().map(|c| c.column).collect();
    assert_eq!(cols, ["legacyId", "OWNER"]);
    assert_eq!(Thing::META.table, "things");
    assert_eq!(Thing::META.column("name").map(|c| c.column), Some("display_name"));
    assert_eq!(Thing::META.column("type").map(|c| c.column), Some("type"));
    assert_eq!(Product::META.ttl.as_secs(), 3600, "default TTL");
    let k = key!("kind:<type>", type = "a b");
    assert_eq!(k.as_str(), "kind:a%20b");
    let p = Product { id: 1, category_id: 2 };
    assert_eq!(p.cache_keys()[1], key!("category:<category_id>:products", category_id = 2));
    let t = Thing {
        id: 1, small: -2, unsigned: 3, flag: false, name: "n".into(), maybe: None, r#type: "t".into(), ignored: 0.5,
    };
    let keys: Vec<String> = t.cache_keys().into_iter().map(|k| k.into_string()).collect();
    assert_eq!(keys, ["thing:1", "small:-2", "u:3", "flag:false", "name:n", "opt:~", "kind:t"]);
}

