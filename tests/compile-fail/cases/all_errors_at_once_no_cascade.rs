use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(key = "product:<idd>", depends = ["x:<>"], ttl = "soon", colour = "red")]
struct Product {
    id: i64,
}

// The stub impl emitted beside the errors keeps uses of the entity from failing too.
fn uses_the_entity(p: &Product) -> String {
    let _ = Product::META;
    p.cache_key().into_string()
}

fn main() {
    let _ = uses_the_entity;
}
