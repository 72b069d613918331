// Generated code uses absolute paths only: local items named like the ones it uses do not break it.
#![allow(dead_code, non_camel_case_types)]

mod core {}
mod std {}
mod cache_runtime {}
struct Key;
struct Template;
struct Vec;
struct Option;
struct String;
struct __KEY;
struct __builder;

#[derive(::cache_runtime::CachedEntity)]
#[cached_entity(key = "hygiene:<id>", depends = ["hygiene:<id>:list"])]
struct Hygiene {
    id: i64,
}

fn main() {
    use ::cache_runtime::CachedEntity as _;
    let h = Hygiene { id: 1 };
    ::std::assert_eq!(h.cache_keys().len(), 2);
    let k = ::cache_runtime::key!("hygiene:<id>:list", id = 1);
    ::std::assert_eq!(k.as_str(), "hygiene:1:list");
}
