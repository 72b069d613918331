use cache_runtime::key;

fn main() {
    let _ = key!("product:<id", id = 5);
    let _ = key!(product, id = 5);
}
