//! The service's error: what a handler's `?` turns the library's and sqlx's errors into, and the HTTP
//! response each becomes.

use std::sync::Arc;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sqlx::error::ErrorKind;

/// Why a request failed.
#[derive(Debug)]
pub(crate) enum AppError {
    /// No such row (also a cached tombstone): `404`.
    NotFound,
    /// A query failed: a violated constraint is the client's mistake (`409` for a duplicate id, `422` for
    /// a category that does not exist), anything else the server's (`500`).
    Database(Arc<sqlx::Error>),
}

/// A loader's error (and a write's).
impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(Arc::new(e))
    }
}

/// A cached read's error: the loader's, shared with every reader that waited for the load.
impl From<Arc<sqlx::Error>> for AppError {
    fn from(e: Arc<sqlx::Error>) -> Self {
        Self::Database(e)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, message) = match &self {
            AppError::NotFound => (StatusCode::NOT_FOUND, "not found".to_owned()),
            AppError::Database(e) => match e.as_database_error() {
                Some(d) => match d.kind() {
                    ErrorKind::UniqueViolation => (StatusCode::CONFLICT, d.message().to_owned()),
                    ErrorKind::ForeignKeyViolation => (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("no such category ({})", d.message()),
                    ),
                    ErrorKind::NotNullViolation | ErrorKind::CheckViolation => {
                        (StatusCode::UNPROCESSABLE_ENTITY, d.message().to_owned())
                    }
                    _ => internal(e),
                },
                None => internal(e),
            },
        };
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}

/// A failure that is not the client's: logged, and answered with `500`.
fn internal(e: &sqlx::Error) -> (StatusCode, String) {
    eprintln!("shop_http: request failed: {e}");
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}
