//! The account pages a browser needs before the dashboard exists: `/` (who is logged in),
//! `/login`, `/register`, `/verify-email` and `/reset-password` (the links in our mail), and
//! `/forgot-password`. One static page, embedded in the binary, that talks to the public API.

use std::sync::LazyLock;

use salvo::http::HeaderValue;
use salvo::prelude::*;

const PAGE: &str = include_str!("../../web/account.html");
const CSS: &str = include_str!("../../web/page.css");

/// The page with its stylesheet inlined, assembled once.
static PAGE_HTML: LazyLock<String> = LazyLock::new(|| PAGE.replace("/*CSS*/", CSS));

/// Serves the account page (the script picks the form from the path).
#[handler]
pub async fn account_page(res: &mut Response) {
    let headers = res.headers_mut();
    headers.insert("content-security-policy", HeaderValue::from_static(
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'",
    ));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    res.render(Text::Html(PAGE_HTML.as_str()));
}
