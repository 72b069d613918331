//! The derive input as the macro sees it: the struct, its named fields and its attribute, with spans.

use syn::{Data, DeriveInput, Fields, Ident, Type};

use crate::attr::{self, Attrs};
use crate::ctxt::Ctxt;
use crate::symbol;

pub(crate) struct Container<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) fields: Vec<Field<'a>>,
    pub(crate) attrs: Attrs,
    /// `false` when the input is not a struct with named fields: placeholders are then not checked.
    pub(crate) has_fields: bool,
}

pub(crate) struct Field<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) ty: &'a Type,
    /// The database column: `#[sqlx(rename = "…")]`, or the field name.
    pub(crate) column: String,
}

impl<'a> Container<'a> {
    /// Reads the input; shape errors (not a struct with named fields, generics) go to `cx`.
    pub(crate) fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput) -> Self {
        let attrs = Attrs::parse(cx, &input.attrs);
        let rename_rule = attr::sqlx_value(&input.attrs, symbol::RENAME_ALL).map(|lit| lit.value());
        let fields = match &input.data {
            Data::Struct(data) => match &data.fields {
                Fields::Named(named) => named
                    .named
                    .iter()
                    .filter_map(|f| {
                        let ident = f.ident.as_ref()?;
                        let column = match attr::sqlx_value(&f.attrs, symbol::RENAME) {
                            Some(lit) => lit.value(),
                            None => match &rename_rule {
                                Some(rule) => attr::rename_all(rule, &unraw(ident)),
                                None => unraw(ident),
                            },
                        };
                        Some(Field {
                            ident,
                            ty: &f.ty,
                            column,
                        })
                    })
                    .collect(),
                Fields::Unnamed(_) | Fields::Unit => {
                    cx.error_spanned_by(
                        &input.ident,
                        "#[derive(CachedEntity)] needs a struct with named fields: placeholders such as `<id>` \
                         name fields, and fields map to columns",
                    );
                    Vec::new()
                }
            },
            Data::Enum(data) => {
                cx.error_spanned_by(
                    data.enum_token,
                    "#[derive(CachedEntity)] is for structs that map a table row; an enum is not a row type",
                );
                Vec::new()
            }
            Data::Union(data) => {
                cx.error_spanned_by(
                    data.union_token,
                    "#[derive(CachedEntity)] is for structs that map a table row; a union is not a row type",
                );
                Vec::new()
            }
        };
        if !input.generics.params.is_empty() {
            cx.error_spanned_by(
                &input.generics,
                "#[derive(CachedEntity)] does not support generic structs: an entity maps one table with \
                 one set of templates; derive it on a concrete struct",
            );
        }
        let has_fields =
            matches!(&input.data, Data::Struct(d) if matches!(d.fields, Fields::Named(_)));
        Self {
            ident: &input.ident,
            fields,
            attrs,
            has_fields,
        }
    }

    pub(crate) fn field(&self, name: &str) -> Option<&Field<'a>> {
        self.fields.iter().find(|f| unraw(f.ident) == name)
    }
}

/// The field name without `r#`.
pub(crate) fn unraw(ident: &Ident) -> String {
    let s = ident.to_string();
    s.strip_prefix("r#")
        .map_or_else(|| s.clone(), str::to_owned)
}
