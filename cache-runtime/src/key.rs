//! Cache keys: templates, placeholder values and the one canonical rendering.
//!
//! The rendering rule is documented on [`Key`].

use std::borrow::Cow;
use std::fmt;

/// The kind of a placeholder value, which decides how it renders (see [`Key`] for the rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PartKind {
    /// Integers: decimal.
    Int,
    /// Booleans: `true` / `false`.
    Bool,
    /// Text and UUIDs: percent-escaped.
    Text,
}

impl PartKind {
    const NAMES: [(Self, &'static str); 3] = [
        (Self::Int, "int"),
        (Self::Bool, "bool"),
        (Self::Text, "text"),
    ];

    /// The kind's name (`int`, `bool`, `text`), as the generated SQL and the install records spell it.
    pub(crate) fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(kind, _)| *kind == self)
            .map_or("text", |(_, name)| name)
    }

    /// The kind named `name` (see [`name`](Self::name)).
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(kind, _)| *kind)
    }
}

/// One piece of a parsed template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Segment {
    /// Literal text, copied into the key as it is.
    Lit(&'static str),
    /// A placeholder naming a field of the entity.
    Placeholder(&'static str),
}

/// A key template, parsed at compile time by `#[derive(CachedEntity)]` or `key!`.
///
/// # Examples
///
/// ```
/// use cache_runtime::CachedEntity;
/// use cache_runtime::key::Segment;
///
/// #[derive(CachedEntity)]
/// #[cached_entity(key = "product:<id>", depends = ["category:<category_id>:products"])]
/// struct Product {
///     id: i64,
///     category_id: i64,
/// }
///
/// let t = Product::META.key;
/// assert_eq!(t.text(), "product:<id>");
/// assert_eq!(t.shape(), "product:<>");
/// assert_eq!(t.segments(), &[Segment::Lit("product:"), Segment::Placeholder("id")]);
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Template {
    text: &'static str,
    shape: &'static str,
    segments: &'static [Segment],
}

impl Template {
    #[doc(hidden)]
    pub const fn __new(
        text: &'static str,
        shape: &'static str,
        segments: &'static [Segment],
    ) -> Self {
        Self {
            text,
            shape,
            segments,
        }
    }

    /// The template as written, e.g. `category:<category_id>:products`.
    pub fn text(&self) -> &'static str {
        self.text
    }

    /// The template with placeholder names removed, e.g. `category:<>:products`.
    ///
    /// Two templates with the same shape render the same keys for the same values, whatever their
    /// placeholders are called, so they address the same cache entries.
    pub fn shape(&self) -> &'static str {
        self.shape
    }

    /// The literal and placeholder segments, in order.
    pub fn segments(&self) -> &'static [Segment] {
        self.segments
    }

    /// The placeholder names, in order of appearance.
    pub fn placeholders(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.segments.iter().filter_map(|s| match s {
            Segment::Placeholder(name) => Some(*name),
            Segment::Lit(_) => None,
        })
    }

    /// Renders this template from dynamic values, one per placeholder in order.
    ///
    /// # Errors
    ///
    /// [`KeyError::Arity`] when the number of values differs from the number of placeholders.
    ///
    /// # Examples
    ///
    /// ```
    /// use cache_runtime::CachedEntity;
    /// use cache_runtime::key::KeyValue;
    /// # #[derive(CachedEntity)]
    /// # #[cached_entity(key = "user:<name>")]
    /// # struct User { name: String }
    /// let key = User::META.key.render(&[KeyValue::Text("a:b".into())])?;
    /// assert_eq!(key.as_str(), "user:a%3Ab");
    /// # Ok::<(), cache_runtime::key::KeyError>(())
    /// ```
    pub fn render(&'static self, values: &[KeyValue]) -> Result<Key, KeyError> {
        let wanted = self.placeholders().count();
        if wanted != values.len() {
            return Err(KeyError::Arity {
                template: self.text,
                expected: wanted,
                found: values.len(),
            });
        }
        let mut values = values.iter();
        let builder =
            self.segments
                .iter()
                .fold(KeyBuilder::new(self), |b, segment| match segment {
                    Segment::Lit(text) => b.lit(text),
                    Segment::Placeholder(_) => match values.next() {
                        Some(value) => b.part(value),
                        None => b,
                    },
                });
        Ok(builder.finish())
    }

    /// Parses a rendered key back into its placeholder values (as text, `None` for `~`).
    ///
    /// Returns `None` when `key` is not a rendering of this template.
    ///
    /// # Examples
    ///
    /// ```
    /// # use cache_runtime::CachedEntity;
    /// # #[derive(CachedEntity)]
    /// # #[cached_entity(key = "user:<name>:<id>")]
    /// # struct User { name: String, id: Option<i64> }
    /// let values = User::META.key.parse("user:a%3Ab:~");
    /// assert_eq!(values, Some(vec![Some("a:b".to_string()), None]));
    /// assert_eq!(User::META.key.parse("product:1"), None);
    /// ```
    pub fn parse(&self, key: &str) -> Option<Vec<Option<String>>> {
        let mut out = Vec::new();
        let rest = self.strip(key, |raw| {
            out.push(unescape(raw)?);
            Some(())
        })?;
        rest.is_empty().then_some(out)
    }

    /// The key of this template that `key` starts with (`key` being a rendering of a template that extends
    /// this one, such as a variant of it); `None` when it does not start with one.
    pub(crate) fn key_prefix(&'static self, key: &str) -> Option<Key> {
        let rest = self.strip(key, |_| Some(()))?;
        let text = key[..key.len() - rest.len()].to_owned();
        Some(Key {
            text,
            template: self,
        })
    }

    /// Matches this template's segments at the start of `key`, handing each placeholder's raw value to
    /// `value`; returns what follows.
    fn strip<'k>(
        &self,
        key: &'k str,
        mut value: impl FnMut(&'k str) -> Option<()>,
    ) -> Option<&'k str> {
        let mut rest = key;
        for segment in self.segments {
            match segment {
                Segment::Lit(text) => rest = rest.strip_prefix(text)?,
                Segment::Placeholder(_) => {
                    let end = rest.find(|c: char| !is_value_char(c)).unwrap_or(rest.len());
                    let (raw, tail) = rest.split_at(end);
                    value(raw)?;
                    rest = tail;
                }
            }
        }
        Some(rest)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text)
    }
}

/// `true` for the characters a rendered value can contain: `A-Z a-z 0-9 _ . - % ~`.
///
/// A template's placeholder must be followed by the end of the template or by a character for which this is
/// `false`; the derive checks it. (The rule lives in `cache-template`, shared with the derive.)
///
/// # Examples
///
/// ```
/// assert!(cache_runtime::key::is_value_char('%'));
/// assert!(!cache_runtime::key::is_value_char(':'));
/// ```
pub use cache_template::is_value_char;

/// What `NULL` / `None` renders as: `~`.
pub use cache_template::NULL_RENDERING;

use cache_template::unescape;

/// A rendered cache key, together with the template it was rendered from.
///
/// # Rendering
///
/// A template is literal text with `<field>` placeholders, for example `category:<category_id>:products`.
/// A key is the template with every placeholder replaced by the rendering of its value:
///
/// | value | rendering |
/// |---|---|
/// | integer (`i8`…`i64`, `u8`…`u64`) | decimal, `-` for negatives: `42`, `-7` |
/// | `bool` | `true` / `false` |
/// | text (`String`, `&str`, UUID) | every UTF-8 byte outside `A-Z a-z 0-9 _ . -` becomes `%XX` (upper-case hex) |
/// | `None` / SQL `NULL` | `~` |
///
/// UUIDs render as their lower-case hyphenated text (`67e55044-10b1-426f-9247-bb680e5fe0c8`), which the text
/// rule leaves unchanged.
///
/// A rendered value therefore only ever contains `A-Z a-z 0-9 _ . - % ~`, and the derive requires every
/// placeholder to be followed by the end of the template or by a literal character outside that set (a
/// *separator*, such as `:`). So no value can reach into the literal text of its template: a key parses back to
/// exactly one tuple of values ([`Template::parse`]), and distinct values render distinct keys. A value such as
/// `"admin:secret"` renders as `admin%3Asecret` and cannot impersonate another key.
///
/// The database triggers render keys with the same rule in SQL, byte for byte.
///
/// Build one with the `key!` macro (checked at compile time against the declared templates), with
/// [`CachedEntity::cache_key`](crate::CachedEntity::cache_key), or with [`Template::render`].
///
/// # Examples
///
/// ```
/// use cache_runtime::{key, CachedEntity};
///
/// #[derive(CachedEntity)]
/// #[cached_entity(key = "product:<id>", depends = ["category:<category_id>:products"])]
/// struct Product {
///     id: i64,
///     category_id: i64,
/// }
///
/// let k = key!("category:<category_id>:products", category_id = 5);
/// assert_eq!(k.as_str(), "category:5:products");
/// assert_eq!(k.template().shape(), "category:<>:products");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    text: String,
    template: &'static Template,
}

impl Key {
    /// The rendered key.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The template this key was rendered from.
    pub fn template(&self) -> &'static Template {
        self.template
    }

    /// The rendered key, by value.
    pub fn into_string(self) -> String {
        self.text
    }
}

impl From<&Key> for Key {
    fn from(key: &Key) -> Self {
        key.clone()
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Builds a [`Key`] segment by segment; used by generated code.
#[doc(hidden)]
#[derive(Debug)]
pub struct KeyBuilder {
    text: String,
    template: &'static Template,
}

impl KeyBuilder {
    #[doc(hidden)]
    pub fn new(template: &'static Template) -> Self {
        Self {
            text: String::with_capacity(template.text.len() + 8),
            template,
        }
    }

    #[doc(hidden)]
    #[must_use]
    pub fn lit(mut self, text: &str) -> Self {
        self.text.push_str(text);
        self
    }

    #[doc(hidden)]
    #[must_use]
    pub fn part<P: KeyPart + ?Sized>(mut self, value: &P) -> Self {
        value.write_key_part(KeyWriter {
            out: &mut self.text,
        });
        self
    }

    #[doc(hidden)]
    pub fn finish(self) -> Key {
        Key {
            text: self.text,
            template: self.template,
        }
    }
}

/// Where a [`KeyPart`] writes its rendering; it accepts exactly one value.
#[derive(Debug)]
pub struct KeyWriter<'a> {
    out: &'a mut String,
}

impl KeyWriter<'_> {
    /// Writes an integer in decimal.
    pub fn int(self, value: impl Into<i128>) {
        use fmt::Write as _;
        // Writing to a String cannot fail.
        let _ = write!(self.out, "{}", value.into());
    }

    /// Writes `true` or `false`.
    pub fn bool(self, value: bool) {
        self.out.push_str(if value { "true" } else { "false" });
    }

    /// Writes text, percent-escaping every byte outside `A-Z a-z 0-9 _ . -`.
    pub fn text(self, value: &str) {
        cache_template::escape_into(self.out, value);
    }

    /// Writes the rendering of `NULL` (`~`).
    pub fn null(self) {
        self.out.push_str(NULL_RENDERING);
    }
}

/// A type whose values can fill a key placeholder.
///
/// Implemented for the integers, `bool`, `String`/`str`, `uuid::Uuid` (feature `uuid`), `Option<T>` and
/// references. Implement it for a newtype by delegating to the inner value, keeping [`KIND`](Self::KIND) equal
/// to the inner type's, so that Rust renders the column exactly as the database triggers do.
///
/// # Examples
///
/// ```
/// use cache_runtime::KeyPart;
/// use cache_runtime::key::{KeyWriter, PartKind};
///
/// struct ProductId(i64);
///
/// impl KeyPart for ProductId {
///     const KIND: PartKind = PartKind::Int;
///     fn write_key_part(&self, out: KeyWriter<'_>) {
///         self.0.write_key_part(out)
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be part of a cache key",
    label = "this type has no canonical key rendering",
    note = "key placeholders accept integers, `bool`, `String`/`&str`, `uuid::Uuid` (feature `uuid`) and `Option` of \
            those; implement `cache_runtime::KeyPart` for a newtype by delegating to its inner value"
)]
pub trait KeyPart {
    /// How values of this type render; decides the SQL rendering of the column.
    const KIND: PartKind;

    /// Writes this value's rendering.
    fn write_key_part(&self, out: KeyWriter<'_>);
}

macro_rules! int_parts {
    ($($t:ty),*) => {$(
        impl KeyPart for $t {
            const KIND: PartKind = PartKind::Int;
            fn write_key_part(&self, out: KeyWriter<'_>) {
                out.int(*self)
            }
        }
    )*};
}
int_parts!(i8, i16, i32, i64, u8, u16, u32, u64);

impl KeyPart for bool {
    const KIND: PartKind = PartKind::Bool;
    fn write_key_part(&self, out: KeyWriter<'_>) {
        out.bool(*self)
    }
}

impl KeyPart for str {
    const KIND: PartKind = PartKind::Text;
    fn write_key_part(&self, out: KeyWriter<'_>) {
        out.text(self)
    }
}

impl KeyPart for String {
    const KIND: PartKind = PartKind::Text;
    fn write_key_part(&self, out: KeyWriter<'_>) {
        out.text(self)
    }
}

impl KeyPart for Cow<'_, str> {
    const KIND: PartKind = PartKind::Text;
    fn write_key_part(&self, out: KeyWriter<'_>) {
        out.text(self)
    }
}

#[cfg(feature = "uuid")]
impl KeyPart for uuid::Uuid {
    const KIND: PartKind = PartKind::Text;
    fn write_key_part(&self, out: KeyWriter<'_>) {
        out.text(
            self.hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer()),
        )
    }
}

impl<T: KeyPart> KeyPart for Option<T> {
    const KIND: PartKind = T::KIND;
    fn write_key_part(&self, out: KeyWriter<'_>) {
        match self {
            Some(value) => value.write_key_part(out),
            None => out.null(),
        }
    }
}

impl<T: KeyPart + ?Sized> KeyPart for &T {
    const KIND: PartKind = T::KIND;
    fn write_key_part(&self, out: KeyWriter<'_>) {
        (**self).write_key_part(out)
    }
}

/// A placeholder value known only at run time (tests, tools, parsed keys).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyValue {
    /// `NULL` / `None`.
    Null,
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// Text.
    Text(String),
}

impl KeyPart for KeyValue {
    /// A dynamic value has no static kind; this constant is not used for it.
    const KIND: PartKind = PartKind::Text;
    fn write_key_part(&self, out: KeyWriter<'_>) {
        match self {
            Self::Null => out.null(),
            Self::Int(v) => out.int(*v),
            Self::Bool(v) => out.bool(*v),
            Self::Text(v) => out.text(v),
        }
    }
}

/// Errors building keys at run time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// [`Template::render`] got a different number of values than the template has placeholders.
    #[error("template `{template}` has {expected} placeholder(s) but {found} value(s) were given")]
    Arity {
        /// The template.
        template: &'static str,
        /// Its number of placeholders.
        expected: usize,
        /// The number of values given.
        found: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    static T: Template = Template::__new(
        "t:<a>:<b>/x",
        "t:<>:<>/x",
        &[
            Segment::Lit("t:"),
            Segment::Placeholder("a"),
            Segment::Lit(":"),
            Segment::Placeholder("b"),
            Segment::Lit("/x"),
        ],
    );

    fn render(a: &KeyValue, b: &KeyValue) -> String {
        T.render(&[a.clone(), b.clone()])
            .expect("two values for two placeholders")
            .into_string()
    }

    #[test]
    fn renders_the_documented_rule() {
        let k = render(&KeyValue::Int(-7), &KeyValue::Text("a:b%c ü<>{}".into()));
        assert_eq!(k, "t:-7:a%3Ab%25c%20%C3%BC%3C%3E%7B%7D/x");
        assert_eq!(render(&KeyValue::Null, &KeyValue::Bool(true)), "t:~:true/x");
        assert_eq!(
            render(&KeyValue::Text("~".into()), &KeyValue::Text(String::new())),
            "t:%7E:/x"
        );
    }

    #[test]
    fn arity_is_checked() {
        assert_eq!(
            T.render(&[KeyValue::Null]),
            Err(KeyError::Arity {
                template: "t:<a>:<b>/x",
                expected: 2,
                found: 1
            })
        );
    }

    #[test]
    fn parse_rejects_foreign_keys() {
        assert_eq!(T.parse("t:1:2/y"), None);
        assert_eq!(T.parse("t:1:2/x/"), None);
        assert_eq!(T.parse("t:%zz:2/x"), None);
        assert_eq!(
            T.parse("t:%3a:2/x"),
            None,
            "lower-case hex is not canonical"
        );
        assert_eq!(
            T.parse("t:1:2/x"),
            Some(vec![Some("1".into()), Some("2".into())])
        );
    }

    fn value() -> impl Strategy<Value = KeyValue> {
        prop_oneof![
            Just(KeyValue::Null),
            any::<i64>().prop_map(KeyValue::Int),
            any::<bool>().prop_map(KeyValue::Bool),
            any::<String>().prop_map(KeyValue::Text),
            "[:<>%{}~ _.-]{0,6}".prop_map(KeyValue::Text),
        ]
    }

    fn as_text(v: &KeyValue) -> Option<String> {
        match v {
            KeyValue::Null => None,
            KeyValue::Int(i) => Some(i.to_string()),
            KeyValue::Bool(b) => Some(b.to_string()),
            KeyValue::Text(s) => Some(s.clone()),
        }
    }

    proptest! {
        #[test]
        fn rendered_keys_parse_back(a in value(), b in value()) {
            let key = render(&a, &b);
            prop_assert_eq!(T.parse(&key), Some(vec![as_text(&a), as_text(&b)]));
        }

        #[test]
        fn distinct_values_render_distinct_keys(a1 in value(), b1 in value(), a2 in value(), b2 in value()) {
            // Values of one kind per position, as the derive guarantees: compare their text forms.
            if (as_text(&a1), as_text(&b1)) != (as_text(&a2), as_text(&b2)) {
                prop_assert_ne!(render(&a1, &b1), render(&a2, &b2));
            }
        }
    }
}
