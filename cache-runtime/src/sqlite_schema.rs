//! Stub (replaced by the real module).
#![allow(dead_code, missing_docs)]
use crate::error::Error;
use crate::registry::Registry;
#[derive(Debug, Clone)]
pub(crate) struct Renderer;
impl Renderer {
    pub(crate) fn new(_r: &Registry) -> Self { Renderer }
    pub(crate) fn keys(&self, _t: &str, _i: &str, _o: &mut Vec<String>) -> Result<(), String> { Err("stub".into()) }
}
pub(crate) async fn install(_r: &Registry, _c: &mut sqlx::SqliteConnection) -> Result<(), Error> { Ok(()) }
pub(crate) async fn verify(_r: &Registry, _c: &mut sqlx::SqliteConnection) -> Result<(), Error> { Ok(()) }
