//! The rules of `cache-runtime` keys, in one place: the derive (at compile time), the runtime (when it renders
//! and parses keys) and the SQL generators (which render keys in triggers) all take them from here.
//!
//! - [`grammar`]: a template is literal text and `<field>` placeholders ([`parse`], [`Template::shape`]);
//! - [`escape`]: how a text value renders inside a key ([`escape_into`], [`unescape`], [`is_value_char`],
//!   [`NULL_RENDERING`], [`SQL_CLASS`]);
//! - [`fnv`]: FNV-1a 64 ([`fnv1a64`]), the stable hash behind template ids and registry fingerprints.
//!
//! The crate has no dependencies, so that a proc-macro crate can use it without slowing builds down.
//!
//! # Examples
//!
//! ```
//! use cache_template::{escape_into, parse, unescape};
//!
//! let template = parse("category:<category_id>:products").map_err(|errors| errors.join("; "))?;
//! assert_eq!(template.shape(), "category:<>:products");
//!
//! let mut key = String::from("user:");
//! escape_into(&mut key, "a:b");
//! assert_eq!(key, "user:a%3Ab");
//! assert_eq!(unescape("a%3Ab"), Some(Some("a:b".to_owned())));
//! # Ok::<(), String>(())
//! ```

pub mod escape;
pub mod fnv;
pub mod grammar;

pub use escape::{
    NULL_RENDERING, SQL_CLASS, UNRESERVED_PUNCTUATION, escape_into, is_unreserved, is_value_char,
    unescape,
};
pub use fnv::fnv1a64;
pub use grammar::{Segment, Template, parse};
