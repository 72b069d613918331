//! The record each installer (a build, named by its registry's fingerprint) keeps of its entities per
//! table (see `parts`), and the merge of several builds' records into the entity a table's capture renders.
//!
//! A record is text, one line per item, every value escaped by the key rendering rule (so no value can
//! contain a separator): `entity <type> <table> <ttl ms>`, then the entity's `template <text>` lines (key
//! first) and `column <field> <column> <kind>` lines.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::entity::{Column, EntityMeta};
use crate::key::{PartKind, Segment, Template};

/// The record of `entities` (all of one table).
pub(super) fn encode(entities: &[&EntityMeta]) -> String {
    let mut out = String::new();
    let mut line = |fields: &[&str]| {
        let escaped: Vec<String> = fields
            .iter()
            .map(|f| {
                let mut s = String::new();
                cache_template::escape_into(&mut s, f);
                s
            })
            .collect();
        out.push_str(&escaped.join(" "));
        out.push('\n');
    };
    for entity in entities {
        let ttl = entity.ttl.as_millis().to_string();
        line(&["entity", entity.type_name, entity.table, &ttl]);
        for template in entity.templates() {
            line(&["template", template.text()]);
        }
        for column in entity.columns {
            line(&["column", column.field, column.column, column.kind.name()]);
        }
    }
    out
}

/// The entities of a record, as static metadata (leaked: an install decodes a handful of records).
///
/// # Errors
///
/// A description of the first malformed line.
pub(super) fn decode(record: &str) -> Result<Vec<&'static EntityMeta>, String> {
    let mut entities: Vec<(Vec<String>, Vec<&'static Template>, Vec<Column>)> = Vec::new();
    for line in record.lines() {
        let fields: Vec<String> = line
            .split(' ')
            .map(|f| {
                cache_template::unescape(f)
                    .flatten()
                    .ok_or_else(|| format!("bad field {f:?}"))
            })
            .collect::<Result<_, _>>()?;
        match (fields.first().map(String::as_str), entities.last_mut()) {
            (Some("entity"), _) if fields.len() == 4 => {
                entities.push((fields, Vec::new(), Vec::new()));
            }
            (Some("template"), Some(entity)) if fields.len() == 2 => {
                entity.1.push(template(&fields[1])?);
            }
            (Some("column"), Some(entity)) if fields.len() == 4 => entity.2.push(Column {
                field: leak(&fields[1]),
                column: leak(&fields[2]),
                kind: PartKind::from_name(&fields[3])
                    .ok_or_else(|| format!("bad kind {:?}", fields[3]))?,
            }),
            _ => return Err(format!("bad line {line:?}")),
        }
    }
    entities
        .into_iter()
        .map(|(head, templates, columns)| {
            let (key, depends) = templates
                .split_first()
                .ok_or_else(|| format!("entity {} without a key", head[1]))?;
            let ttl = head[3]
                .parse()
                .map_err(|_| format!("bad ttl {:?}", head[3]))?;
            Ok(&*Box::leak(Box::new(EntityMeta {
                type_name: leak(&head[1]),
                table: leak(&head[2]),
                key,
                depends: Box::leak(depends.to_vec().into_boxed_slice()),
                variants: &[],
                ttl: Duration::from_millis(ttl),
                columns: Box::leak(columns.into_boxed_slice()),
            })))
        })
        .collect()
}

/// One entity standing for every entity of `table` in `entities`: their templates, with placeholders
/// named after the columns they read (different builds may name a column's field differently), each
/// rendering once.
pub(super) fn merge(entities: &[&'static EntityMeta]) -> Option<&'static EntityMeta> {
    let first = entities.first()?;
    let mut columns: BTreeMap<&'static str, PartKind> = BTreeMap::new();
    let mut templates: Vec<&'static Template> = Vec::new();
    for entity in entities {
        for template in entity.templates() {
            let renamed = by_column(entity, template);
            if !templates.iter().any(|t| t.text() == renamed.text()) {
                templates.push(renamed);
            }
        }
        for column in entity.columns {
            columns.entry(column.column).or_insert(column.kind);
        }
    }
    let (key, depends) = templates.split_first()?;
    let columns: Vec<Column> = columns
        .into_iter()
        .map(|(column, kind)| Column {
            field: column,
            column,
            kind,
        })
        .collect();
    Some(Box::leak(Box::new(EntityMeta {
        type_name: first.type_name,
        table: first.table,
        key,
        depends: Box::leak(depends.to_vec().into_boxed_slice()),
        variants: &[],
        ttl: first.ttl,
        columns: Box::leak(columns.into_boxed_slice()),
    })))
}

/// `template` with each placeholder named after the column it reads.
fn by_column(entity: &EntityMeta, template: &Template) -> &'static Template {
    let text: String = template
        .segments()
        .iter()
        .map(|s| match s {
            Segment::Lit(text) => (*text).to_owned(),
            Segment::Placeholder(field) => {
                format!("<{}>", entity.column(field).map_or(*field, |c| c.column))
            }
        })
        .collect();
    let segments: Vec<Segment> = template
        .segments()
        .iter()
        .map(|s| match s {
            Segment::Lit(text) => Segment::Lit(text),
            Segment::Placeholder(field) => {
                Segment::Placeholder(entity.column(field).map_or(*field, |c| c.column))
            }
        })
        .collect();
    Box::leak(Box::new(Template::__new(
        leak(&text),
        template.shape(),
        Box::leak(segments.into_boxed_slice()),
    )))
}

/// A template parsed from its text (a record holds texts that a derive accepted).
fn template(text: &str) -> Result<&'static Template, String> {
    let parsed = cache_template::parse(text).map_err(|e| e.join("; "))?;
    let shape = leak(&parsed.shape());
    let segments: Vec<Segment> = parsed
        .segments
        .iter()
        .map(|s| match s {
            cache_template::Segment::Lit(text) => Segment::Lit(leak(text)),
            cache_template::Segment::Placeholder(name) => Segment::Placeholder(leak(name)),
        })
        .collect();
    Ok(Box::leak(Box::new(Template::__new(
        leak(text),
        shape,
        Box::leak(segments.into_boxed_slice()),
    ))))
}

fn leak(text: &str) -> &'static str {
    Box::leak(text.to_owned().into_boxed_str())
}
