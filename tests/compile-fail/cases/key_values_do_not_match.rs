use cache_runtime::key;

fn main() {
    let _ = key!("product:<id>");
    let _ = key!("product:<id>", idd = 5);
    let _ = key!("product:<id>", id = 5, id = 6);
    let _ = key!("category:<category_id>:products", category_id = 5, extra = 1);
}
