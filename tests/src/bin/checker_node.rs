//! One process of the multi-process freshness checker (see `tests::processes`): reads its role from the
//! environment, runs its readers and writer, and prints its log on stdout.

#[tokio::main]
async fn main() {
    let node = tests::processes::Node::from_env();
    let events = tests::processes::run_node(&node).await;
    let mut out = String::new();
    for event in events {
        out.push_str(&event.line());
        out.push('\n');
    }
    print!("{out}");
}
