use cache_runtime::CachedEntity;

#[derive(CachedEntity)]
#[cached_entity(
    key = "article:<slug>",
    depends = ["topic:<topic_id>:articles"],
    // Extends no declared template: nothing would ever invalidate it.
    variants = ["post:<slug>:as:<viewer>", "article:<slug>:as:<viewer>", "article:<slug>:as:<viewer>"]
)]
struct Article {
    slug: String,
    topic_id: i64,
}

fn main() {}
