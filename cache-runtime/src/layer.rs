//! [`TokenLayer`] (feature `tower`): carries [read-your-writes tokens](crate::token) between HTTP requests,
//! so that a user who writes in one request and reads in the next, on another instance, sees their write.
//!
//! Per request, the layer reads a [`WriteToken`] from a header (`x-cache-token` by default) or a cookie
//! (`cache_token`), puts it in the request's extensions, and runs the inner service inside a
//! [`token::scope`](crate::token::scope()) with it: every cache read of the request honors it. The newest
//! token of the request's writes through a [`CachedPool`](crate::CachedPool) goes back in the response: in
//! the same header, and as a `Set-Cookie` (`Path=/; Max-Age=300; SameSite=Lax; HttpOnly` by default), so a
//! browser sends it with its next request and an API client can copy the header.
//!
//! # Examples
//!
//! ```
//! use cache_runtime::layer::TokenLayer;
//! # fn app<S>(service: S) -> cache_runtime::layer::TokenService<S> {
//! use tower_layer::Layer as _;
//! let layer = TokenLayer::new().cookie_max_age(std::time::Duration::from_secs(60));
//! layer.layer(service) // with axum: `router.layer(TokenLayer::new())`
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{COOKIE, HeaderName, HeaderValue, SET_COOKIE};
use http::{Request, Response};

use crate::token::{self, WriteToken};

/// A tower layer that carries read-your-writes tokens in a header and a cookie (see the
/// [module docs](self)).
#[derive(Debug, Clone)]
pub struct TokenLayer {
    config: Arc<Config>,
}

#[derive(Debug, Clone)]
struct Config {
    header: HeaderName,
    cookie: Option<String>,
    max_age: Duration,
}

impl Default for TokenLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenLayer {
    /// The layer with the header `x-cache-token` and the cookie `cache_token` (Max-Age 5 minutes).
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config {
                header: HeaderName::from_static("x-cache-token"),
                cookie: Some("cache_token".to_owned()),
                max_age: Duration::from_secs(300),
            }),
        }
    }

    /// The header the token is read from and written to.
    #[must_use]
    pub fn header(mut self, header: HeaderName) -> Self {
        Arc::make_mut(&mut self.config).header = header;
        self
    }

    /// The cookie the token is read from and set in (`None`: no cookie, the header only). The name must
    /// be a cookie name (letters, digits, `_`, `-`).
    #[must_use]
    pub fn cookie(mut self, name: Option<&str>) -> Self {
        Arc::make_mut(&mut self.config).cookie = name.map(str::to_owned);
        self
    }

    /// How long the browser keeps the cookie (default 5 minutes): longer than any delivery takes, so a
    /// token older than this is satisfied anyway.
    #[must_use]
    pub fn cookie_max_age(mut self, max_age: Duration) -> Self {
        Arc::make_mut(&mut self.config).max_age = max_age;
        self
    }
}

impl<S> tower_layer::Layer<S> for TokenLayer {
    type Service = TokenService<S>;

    fn layer(&self, inner: S) -> TokenService<S> {
        TokenService {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The service of a [`TokenLayer`].
#[derive(Debug, Clone)]
pub struct TokenService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S, B, R> tower_service::Service<Request<B>> for TokenService<S>
where
    S: tower_service::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let read = self.config.token_of(&request);
        if let Some(token) = read {
            request.extensions_mut().insert(token);
        }
        let response = self.inner.call(request);
        let config = Arc::clone(&self.config);
        Box::pin(async move {
            let (response, written) = token::scope(read, response).await;
            let mut response = response?;
            if let Some(written) = written {
                let newest = read.map_or(written, |r| r.newest(written));
                config.write(&mut response, newest);
            }
            Ok(response)
        })
    }
}

impl Config {
    /// The request's token: its header, else its cookie. Unparsable values are ignored (logged).
    fn token_of<B>(&self, request: &Request<B>) -> Option<WriteToken> {
        let from_header = request
            .headers()
            .get(&self.header)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = from_header.or_else(|| {
            let name = self.cookie.as_deref()?;
            request
                .headers()
                .get_all(COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|pair| {
                    let (n, v) = pair.trim().split_once('=')?;
                    (n == name).then(|| v.trim().to_owned())
                })
        })?;
        match text.parse() {
            Ok(token) => Some(token),
            Err(error) => {
                tracing::debug!(%error, "ignoring a cache token");
                None
            }
        }
    }

    /// Writes `token` in the response's header and cookie.
    fn write<R>(&self, response: &mut Response<R>, token: WriteToken) {
        let text = token.to_string();
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&text) {
            headers.insert(self.header.clone(), value);
        }
        if let Some(name) = &self.cookie {
            let cookie = format!(
                "{name}={text}; Path=/; Max-Age={}; SameSite=Lax; HttpOnly",
                self.max_age.as_secs()
            );
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                headers.append(SET_COOKIE, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_header_or_the_cookie() {
        let config = TokenLayer::new().config;
        let token = "w1.2a.00000000000000ff.p";
        let header = Request::builder()
            .header("x-cache-token", token)
            .body(())
            .expect("request");
        assert_eq!(config.token_of(&header).map(|t| t.position()), Some(0x2a));
        let cookie = Request::builder()
            .header("cookie", format!("a=b; cache_token={token}; c=d"))
            .body(())
            .expect("request");
        assert_eq!(config.token_of(&cookie).map(|t| t.position()), Some(0x2a));
        let garbage = Request::builder()
            .header("x-cache-token", "nope")
            .body(())
            .expect("request");
        assert_eq!(config.token_of(&garbage), None);
    }
}
