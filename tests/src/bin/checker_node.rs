//! One process of the multi-process freshness checker (see `src/processes.rs`): reads its role from the
//! environment, runs its readers and writer, and prints its log on stdout.

#[path = "../processes.rs"]
mod processes;

#[tokio::main]
async fn main() {
    let node = processes::Node::from_env();
    let events = processes::run_node(&node).await;
    let mut out = String::new();
    for event in events {
        out.push_str(&event.line());
        out.push('\n');
    }
    print!("{out}");
}
