//! Rendering SQLite outbox rows (a table and a JSON image of the row's placeholder columns) into keys, with
//! the code that renders keys on the Rust side ([`Template::render`]), so both agree byte for byte.

use std::collections::HashMap;
use std::sync::Arc;

use crate::key::{KeyError, KeyValue, PartKind, Template};
use crate::registry::Registry;

/// Why an outbox row could not be rendered into keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RenderError {
    /// The row names a table no entity maps.
    #[error("outbox row of table `{0}`, which no entity maps")]
    UnknownTable(String),
    /// The image is not a JSON object.
    #[error("outbox row of table `{table}`: image is not a JSON object ({reason}): {image}")]
    NotAnObject {
        /// The row's table.
        table: String,
        /// The JSON parser's message.
        reason: String,
        /// The image as stored.
        image: String,
    },
    /// The image lacks a placeholder column.
    #[error("outbox row of table `{table}`: image lacks column `{column}`")]
    MissingColumn {
        /// The row's table.
        table: String,
        /// The missing column.
        column: &'static str,
    },
    /// A column holds a value that has no key rendering.
    #[error("outbox row of table `{table}`, column `{column}`: {reason}")]
    BadValue {
        /// The row's table.
        table: String,
        /// The column.
        column: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
    /// A template could not be rendered from the values.
    #[error("outbox row of table `{table}`: {error}")]
    Template {
        /// The row's table.
        table: String,
        /// The rendering error.
        error: KeyError,
    },
}

/// One template of a table, with the column and kind of each placeholder in order.
#[derive(Debug)]
struct Plan {
    /// The template to render.
    template: &'static Template,
    /// Per placeholder, in order: the column (the image's key) and its kind; `None` when the placeholder
    /// names no column (the derive prevents it; rendered as `NULL`).
    parts: Vec<Option<(&'static str, PartKind)>>,
}

/// Turns outbox rows (table and JSON image) into keys, with the same rendering as the Rust side.
///
/// Cheap to clone (shared behind an [`Arc`]).
#[derive(Debug, Clone)]
pub(crate) struct Renderer {
    /// Per table, the templates of its entities (identical renderings deduplicated).
    plans: Arc<HashMap<&'static str, Vec<Plan>>>,
}

impl Renderer {
    /// The renderer of `registry`'s entities.
    pub(crate) fn new(registry: &Registry) -> Self {
        let mut plans: HashMap<&'static str, Vec<Plan>> = HashMap::new();
        for entity in registry.entities() {
            let table = plans.entry(entity.table).or_default();
            for template in entity.templates() {
                let parts: Vec<_> = template
                    .placeholders()
                    .map(|field| entity.column(field).map(|c| (c.column, c.kind)))
                    .collect();
                // Two templates of the same shape reading the same columns render the same keys.
                let duplicate = table
                    .iter()
                    .any(|p| p.template.shape() == template.shape() && p.parts == parts);
                if !duplicate {
                    table.push(Plan { template, parts });
                }
            }
        }
        Self {
            plans: Arc::new(plans),
        }
    }

    /// The namespaces of every registered table.
    pub(crate) fn all_namespaces(&self) -> Vec<String> {
        let mut all: Vec<String> = self.plans.keys().flat_map(|t| self.namespaces(t)).collect();
        all.sort();
        all.dedup();
        all
    }

    /// The namespace shapes (`product:<>`) of `table`'s templates: what to invalidate when a row of the
    /// table cannot be rendered.
    pub(crate) fn namespaces(&self, table: &str) -> Vec<String> {
        self.plans
            .get(table)
            .into_iter()
            .flatten()
            .map(|plan| plan.template.shape().to_owned())
            .collect()
    }

    /// Appends the keys of one outbox row (its `tbl` and `image`) to `out`.
    ///
    /// # Errors
    ///
    /// [`RenderError`] when the table is not registered, the image is not a JSON object, or it lacks a
    /// column or holds a value that cannot render; `out` is unchanged then.
    pub(crate) fn keys(
        &self,
        table: &str,
        image: &str,
        out: &mut Vec<String>,
    ) -> Result<(), RenderError> {
        let plans = self
            .plans
            .get(table)
            .ok_or_else(|| RenderError::UnknownTable(table.to_owned()))?;
        let image: serde_json::Map<String, serde_json::Value> = serde_json::from_str(image)
            .map_err(|e| RenderError::NotAnObject {
                table: table.to_owned(),
                reason: e.to_string(),
                image: image.to_owned(),
            })?;
        let mut keys = Vec::with_capacity(plans.len());
        let mut values = Vec::new();
        for plan in plans {
            values.clear();
            for part in &plan.parts {
                let value = match part {
                    Some((column, kind)) => {
                        let json =
                            image
                                .get(*column)
                                .ok_or_else(|| RenderError::MissingColumn {
                                    table: table.to_owned(),
                                    column,
                                })?;
                        key_value(json, *kind).map_err(|reason| RenderError::BadValue {
                            table: table.to_owned(),
                            column,
                            reason,
                        })?
                    }
                    None => KeyValue::Null,
                };
                values.push(value);
            }
            let key = plan
                .template
                .render(&values)
                .map_err(|error| RenderError::Template {
                    table: table.to_owned(),
                    error,
                })?;
            keys.push(key.into_string());
        }
        out.append(&mut keys);
        Ok(())
    }
}

/// The key value of one JSON image value of a column of `kind`.
fn key_value(json: &serde_json::Value, kind: PartKind) -> Result<KeyValue, String> {
    use serde_json::Value;
    Ok(match json {
        Value::Null => KeyValue::Null,
        Value::Bool(b) => KeyValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) if kind == PartKind::Bool => KeyValue::Bool(i != 0),
            Some(i) => KeyValue::Int(i),
            None => KeyValue::Text(n.to_string()),
        },
        Value::String(s) => KeyValue::Text(s.clone()),
        Value::Object(map) => match (map.len(), map.get("blob")) {
            (1, Some(Value::String(hex))) => KeyValue::Text(blob_text(hex)?),
            _ => return Err(format!("unexpected JSON object {json}")),
        },
        Value::Array(_) => return Err(format!("unexpected JSON array {json}")),
    })
}

/// The text of a BLOB given as hex: the lower-case hyphenated UUID for 16 bytes (as `uuid::Uuid` renders),
/// the lower-case hex otherwise.
fn blob_text(hex: &str) -> Result<String, String> {
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("invalid BLOB hex `{hex}`"));
    }
    let lower = hex.to_ascii_lowercase();
    if lower.len() != 32 {
        return Ok(lower);
    }
    let mut out = String::with_capacity(36);
    for (i, c) in lower.chars().enumerate() {
        if matches!(i, 8 | 12 | 16 | 20) {
            out.push('-');
        }
        out.push(c);
    }
    Ok(out)
}
