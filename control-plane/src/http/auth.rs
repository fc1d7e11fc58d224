//! Authentication and the same-origin rule.
//!
//! A request authenticates with `Authorization: Bearer <token>` or the `instapod_session`
//! cookie; both name a row in `sessions` by the token's hash. The [`require_auth`] hoop puts an
//! [`AuthContext`] in the depot or answers 401.
//!
//! *CSRF.* Browsers attach cookies to cross-site requests, so an unsafe request (POST, PUT,
//! PATCH, DELETE) authenticated by the cookie must show that it came from our own pages: its
//! `Origin` (or, when a browser sends none, its `Referer`) must be our origin. [`same_origin`]
//! also refuses any unsafe request whose `Origin` is foreign, authenticated or not (login CSRF).

use salvo::http::Method;
use salvo::http::StatusCode;
use salvo::prelude::*;

use crate::accounts::sessions::AuthContext;
use crate::error::ApiError;
use crate::http::state::app;

pub const SESSION_COOKIE: &str = "instapod_session";

/// How the credential reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    Bearer,
    Cookie,
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer_token(req: &Request) -> Option<String> {
    let value = req.headers().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string())
}

/// Which credential the request carries: the bearer header wins over the cookie.
pub fn credential(req: &Request) -> Option<(String, CredentialSource)> {
    if let Some(token) = bearer_token(req) {
        return Some((token, CredentialSource::Bearer));
    }
    req.cookie(SESSION_COOKIE)
        .map(|cookie| (cookie.value().to_string(), CredentialSource::Cookie))
}

fn is_unsafe(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE)
}

/// `scheme://host[:port]` of a URL, lowercased.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() {
        return None;
    }
    Some(format!(
        "{}://{}",
        scheme.to_ascii_lowercase(),
        authority.to_ascii_lowercase()
    ))
}

/// Whether `origin` (an `Origin` value or a `Referer`'s origin) is ours: the configured public
/// origin, or the origin whose authority is this request's `Host`.
fn is_our_origin(req: &Request, public_url: &str, origin: &str) -> bool {
    let Some(origin) = origin_of(origin) else {
        return false;
    };
    if origin_of(public_url).is_some_and(|ours| ours == origin) {
        return true;
    }
    // The same host reached under another name (localhost vs 127.0.0.1): the origin must be
    // the request's `Host` under the scheme we are served with.
    let scheme = public_url
        .split_once("://")
        .map_or("http", |(scheme, _)| scheme)
        .to_ascii_lowercase();
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    host.is_some_and(|host| origin == format!("{scheme}://{host}"))
}

fn cross_origin() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "cross_origin_request",
        "cross-origin request refused: cookie-authenticated changes must come from the dashboard's own origin",
    )
}

/// Service-wide hoop: an unsafe request with a foreign `Origin` header is refused.
#[handler]
pub async fn same_origin(req: &mut Request, depot: &mut Depot, res: &mut Response, ctrl: &mut FlowCtrl) {
    if !is_unsafe(req.method()) {
        return;
    }
    let public_url = app(depot).config.public_url.clone();
    let origin = req
        .headers()
        .get("origin")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // `Origin: null` (sandboxed frames, some redirects) is foreign too.
    if let Some(origin) = origin
        && !is_our_origin(req, &public_url, &origin)
    {
        cross_origin().write_to(res);
        ctrl.skip_rest();
    }
}

/// Route hoop: authenticates the request or answers 401; enforces the CSRF rule for cookies.
#[handler]
pub async fn require_auth(req: &mut Request, depot: &mut Depot, res: &mut Response, ctrl: &mut FlowCtrl) {
    match authenticate(req, depot).await {
        Ok(context) => {
            depot.insert_typed(context);
        }
        Err(err) => {
            err.write_to(res);
            ctrl.skip_rest();
        }
    }
}

async fn authenticate(req: &Request, depot: &Depot) -> Result<AuthContext, ApiError> {
    let state = app(depot);
    let (token, source) = credential(req).ok_or_else(ApiError::unauthorized)?;
    if source == CredentialSource::Cookie && is_unsafe(req.method()) {
        let claimed = req
            .headers()
            .get("origin")
            .or_else(|| req.headers().get("referer"))
            .and_then(|v| v.to_str().ok());
        match claimed {
            Some(origin) if is_our_origin(req, &state.config.public_url, origin) => {}
            _ => return Err(cross_origin()),
        }
    }
    let mut context = state
        .session_lookup
        .authenticate(&token)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    context.source = source;
    Ok(context)
}

/// The authenticated caller; only call behind [`require_auth`].
pub fn caller(depot: &Depot) -> &AuthContext {
    depot
        .get_typed::<AuthContext>()
        .expect("require_auth runs before every authenticated handler")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert_eq!(
            origin_of("HTTP://Example.com:8080/path?q").as_deref(),
            Some("http://example.com:8080")
        );
        assert_eq!(origin_of("https://a.b").as_deref(), Some("https://a.b"));
        assert_eq!(origin_of("null"), None);
        assert_eq!(origin_of("http:///x"), None);
    }
}
