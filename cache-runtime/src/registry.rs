//! The registry of every `#[derive(CachedEntity)]` linked into the program, and its startup validation.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::OnceLock;

use crate::entity::EntityMeta;

/// One entity's registration; submitted to [`inventory`] by the derive.
#[doc(hidden)]
#[derive(Debug)]
pub struct Registration(pub &'static EntityMeta);

inventory::collect!(Registration);

/// The set of registered entities, ordered by table, then type name.
///
/// # Examples
///
/// ```
/// use cache_runtime::{registry, CachedEntity};
///
/// #[derive(CachedEntity)]
/// #[cached_entity(key = "widget:<id>")]
/// struct Widget {
///     id: i64,
/// }
///
/// let registry = registry();
/// assert!(registry.entities().iter().any(|e| e.table == "widgets"));
/// registry.validate()?;
/// # Ok::<(), cache_runtime::registry::RegistryError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    entities: Vec<&'static EntityMeta>,
}

/// Every entity registered in this program (collected once, on first use).
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry::new(inventory::iter::<Registration>().map(|r| r.0)))
}

impl Registry {
    /// A registry of the given entities (the program's is [`registry()`]; this one serves tests and tools
    /// that work on a subset).
    pub fn new(entities: impl IntoIterator<Item = &'static EntityMeta>) -> Self {
        let mut entities: Vec<_> = entities.into_iter().collect();
        entities.sort_by_key(|e| (e.table, e.type_name));
        entities.dedup_by(|a, b| std::ptr::eq(*a, *b));
        Self { entities }
    }

    /// The entities, ordered by table, then type name.
    pub fn entities(&self) -> &[&'static EntityMeta] {
        &self.entities
    }

    /// The entities that map `table`.
    pub fn for_table<'a>(
        &'a self,
        table: &'a str,
    ) -> impl Iterator<Item = &'static EntityMeta> + 'a {
        self.entities
            .iter()
            .copied()
            .filter(move |e| e.table == table)
    }

    /// Checks that the entities do not contradict each other.
    ///
    /// # Errors
    ///
    /// Every conflict found, in one [`RegistryError`]:
    /// - two entities map the same table with different templates or placeholder columns;
    /// - two entities of different tables own the same `key` template shape (a write to either would
    ///   invalidate the other's entries, and a read could not tell which table the key belongs to).
    pub fn validate(&self) -> Result<(), RegistryError> {
        let mut conflicts = Vec::new();
        let mut by_table: BTreeMap<&str, &EntityMeta> = BTreeMap::new();
        let mut by_key_shape: BTreeMap<&str, &EntityMeta> = BTreeMap::new();
        for &entity in &self.entities {
            if let Some(first) = by_table.insert(entity.table, entity)
                && !same_capture(first, entity)
            {
                conflicts.push(format!(
                        "`{}` and `{}` both map table `{}` but declare different key templates or columns \
                         ({} vs {}); declare the same templates on both, or give the row type one entity",
                        first.type_name,
                        entity.type_name,
                        entity.table,
                        describe(first),
                        describe(entity),
                    ));
            }
            if let Some(first) = by_key_shape.insert(entity.key.shape(), entity)
                && first.table != entity.table
            {
                conflicts.push(format!(
                        "`{}` (table `{}`) and `{}` (table `{}`) both own the key template `{}`; give each \
                         entity a key of its own, e.g. with a different prefix",
                        first.type_name,
                        first.table,
                        entity.type_name,
                        entity.table,
                        entity.key.shape(),
                    ));
            }
        }
        if conflicts.is_empty() {
            Ok(())
        } else {
            Err(RegistryError { conflicts })
        }
    }

    /// A stable fingerprint of everything the database triggers are generated from (tables, templates,
    /// placeholder columns and kinds), in hex.
    ///
    /// Two builds with the same fingerprint install identical triggers.
    pub fn fingerprint(&self) -> String {
        let mut canonical = String::new();
        for entity in &self.entities {
            let _ = write!(canonical, "{}\u{1}{}", entity.table, describe(entity));
            for column in entity.columns {
                let _ = write!(
                    canonical,
                    "\u{1}{}={}:{:?}",
                    column.field, column.column, column.kind
                );
            }
            canonical.push('\u{2}');
        }
        format!("{:016x}", fnv1a64(canonical.as_bytes()))
    }
}

fn same_capture(a: &EntityMeta, b: &EntityMeta) -> bool {
    let columns = |e: &EntityMeta| {
        e.columns
            .iter()
            .map(|c| (c.column, c.kind))
            .collect::<Vec<_>>()
    };
    describe(a) == describe(b) && columns(a) == columns(b)
}

fn describe(entity: &EntityMeta) -> String {
    let mut out = String::new();
    for (i, template) in entity.templates().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        for segment in template.segments() {
            match segment {
                crate::key::Segment::Lit(text) => out.push_str(text),
                crate::key::Segment::Placeholder(field) => {
                    let column = entity.column(field).map_or(*field, |c| c.column);
                    let _ = write!(out, "<{column}>");
                }
            }
        }
    }
    out
}

/// FNV-1a, 64 bits: stable across builds and platforms (the other runtime modules use it from here).
pub(crate) use cache_template::fnv1a64;

/// Entities that contradict each other; see [`Registry::validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("conflicting cached entities:\n- {}", conflicts.join("\n- "))]
pub struct RegistryError {
    /// One sentence per conflict, saying what to change.
    pub conflicts: Vec<String>,
}
