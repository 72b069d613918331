use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(key = "price:<amount>")]
struct Price {
    amount: f64,
}

fn main() {}
