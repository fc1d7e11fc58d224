//! The account pages in a real browser (headless Chromium through chromedriver): register,
//! verify the email with the code from the outbox, log in, see who is signed in, the session
//! cookie hidden from page scripts (HttpOnly), log out; and a page on another origin that tries
//! to create a team and to log the user out with the browser's session cookie.

use instapod_tests::ids::{password_of_len, unique_email, unique_slug};
use instapod_tests::{Browser, ControlPlane, MailKind, StaticPage, register_user};
use serde_json::{Value, json};

const SESSION_COOKIE: &str = "instapod_session";

/// Waits for the outcome of a form on the account page and returns `(class, text)` of its
/// `#status` line (`ok` or `error`).
async fn form_status(browser: &Browser) -> (String, String) {
    let deadline = tokio::time::Instant::now() + instapod_tests::browser::PAGE_TIMEOUT;
    loop {
        let status = browser.wait_for("#status").await;
        let text = status.text().await.expect("the status line has a text");
        let class = status
            .attr("class")
            .await
            .expect("the status line has attributes")
            .unwrap_or_default();
        if !text.is_empty() && text != "…" {
            return (class, text);
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "the form shows no outcome at {}; page text:\n{}",
                browser.url().await,
                browser.page_text().await
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Asserts that the form on the page reports success with exactly `expected`.
async fn assert_form_ok(browser: &Browser, expected: &str) {
    let (class, text) = form_status(browser).await;
    assert_eq!(
        (class.as_str(), text.as_str()),
        ("ok", expected),
        "at {}",
        browser.url().await
    );
}

/// Logs in through `/login` and waits for the account page at `/`.
async fn log_in(browser: &Browser, cp: &ControlPlane, email: &str, password: &str) {
    let base = cp.url();
    browser.open_url(&format!("{base}/login")).await;
    assert_eq!(browser.text_of("h1").await, "Log in");
    browser.fill("#email", email).await;
    browser.fill("#password", password).await;
    browser.click("button[type=submit]").await;
    let signed_in = browser.text_of("#signed-in").await;
    assert_eq!(signed_in, format!("Signed in as {email}"));
    browser.wait_for_url(&format!("{base}/")).await;
}

/// The value of the session cookie as the browser stores it (scripts cannot see it), and
/// whether it is HttpOnly.
async fn session_cookie(browser: &Browser) -> Option<(String, Option<bool>)> {
    browser
        .get_all_cookies()
        .await
        .expect("WebDriver lists the cookies of the current page")
        .into_iter()
        .find(|cookie| cookie.name() == SESSION_COOKIE)
        .map(|cookie| (cookie.value().to_string(), cookie.http_only()))
}

#[tokio::test]
async fn register_verify_log_in_and_log_out_in_a_browser() {
    let cp = ControlPlane::start_default().await;
    let base = cp.url();
    let browser = Browser::open().await;
    let email = unique_email("browser");
    let password = password_of_len(16);
    let name = "Browser Tester";

    // Register.
    browser.open_url(&format!("{base}/register")).await;
    assert_eq!(browser.text_of("h1").await, "Create an account");
    browser.fill("#name", name).await;
    browser.fill("#email", &email).await;
    browser.fill("#password", &password).await;
    browser.click("button[type=submit]").await;
    assert_form_ok(&browser, "Account created: check your mail to verify it, then log in.").await;

    // Verify the email with the code the mail links to; the page fills it in from the URL.
    let code = cp.latest_token(&email, MailKind::VerifyEmail).await;
    browser.open_url(&format!("{base}/verify-email?token={code}")).await;
    assert_eq!(browser.text_of("h1").await, "Verify your email");
    assert_eq!(browser.value_of("#token").await, code, "prefilled code");
    browser.click("button[type=submit]").await;
    assert_form_ok(&browser, "Email verified.").await;

    // Log in: the page redirects to / and shows who is signed in.
    log_in(&browser, &cp, &email, &password).await;
    let page = browser.page_text().await;
    assert!(
        page.contains(&format!("{name} · email verified")),
        "the account page should say the email is verified:\n{page}"
    );
    assert!(
        page.contains(&format!("{name} (owner) — active")),
        "the account page should list the personal team (named after the user):\n{page}"
    );

    // The session cookie exists but page scripts cannot read it.
    let (token, http_only) = session_cookie(&browser)
        .await
        .expect("logging in sets the session cookie");
    assert_eq!(http_only, Some(true), "the session cookie must be HttpOnly");
    let visible = browser.script("return document.cookie;").await;
    let visible = visible.as_str().expect("document.cookie is a string");
    assert!(
        !visible.contains(SESSION_COOKIE) && !visible.contains(&token),
        "document.cookie exposes the session: {visible:?}"
    );
    cp.client()
        .with_token(&token)
        .get_response("/api/auth/user")
        .await
        .assert_status(200);

    // Log out: back on /login, the cookie is gone and the token is revoked.
    browser.click("#logout").await;
    browser.wait_for_url(&format!("{base}/login")).await;
    assert_eq!(browser.text_of("h1").await, "Log in");
    assert_eq!(session_cookie(&browser).await, None, "cookie after logout");
    cp.client()
        .with_token(&token)
        .get_response("/api/auth/user")
        .await
        .assert_error(401, "unauthorized");

    // The account page now sends the visitor to /login.
    browser.open_url(&format!("{base}/")).await;
    browser.wait_for_url(&format!("{base}/login")).await;
    assert_eq!(browser.text_of("h1").await, "Log in");

    browser.close().await;
}

/// The number of teams with this slug.
async fn teams_with_slug(cp: &ControlPlane, slug: &str) -> i64 {
    cp.db()
        .await
        .query_one("SELECT count(*) FROM teams WHERE slug = $1", &[&slug])
        .await
        .expect("count teams")
        .get(0)
}

#[tokio::test]
async fn a_page_on_another_origin_cannot_use_the_session() {
    let cp = ControlPlane::start_default().await;
    let base = cp.url();
    let registration = register_user(&cp, "xsite").await;
    let browser = Browser::open().await;
    log_in(&browser, &cp, &registration.email, &registration.password).await;

    // Another port of 127.0.0.1 is another origin but the same site, so the SameSite=Lax
    // cookie does go along with its form posts: only the Origin check stands in the way. The
    // text/plain body is valid JSON for POST /api/teams.
    let slug = unique_slug("xsite");
    let other = StaticPage::serve(format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Another site</title></head><body>
<form method="post" action="{base}/api/teams" enctype="text/plain">
<input type="hidden" name='{{"slug":"{slug}","name":"Hijacked' value='"}}'>
<button id="create-team" type="submit">Create a team</button>
</form>
<form method="post" action="{base}/api/auth/logout">
<button id="log-out" type="submit">Log out</button>
</form>
</body></html>"#
    ))
    .await;
    assert_ne!(format!("{base}/"), other.url(), "two different origins");

    browser.open_url(other.url()).await;
    browser.click("#create-team").await;
    browser.wait_for_url(&format!("{base}/api/teams")).await;
    let answer = browser.page_text().await;
    assert!(
        answer.contains("cross_origin_request"),
        "the cross-origin team creation should be refused as cross_origin_request:\n{answer}"
    );
    assert_eq!(teams_with_slug(&cp, &slug).await, 0, "a team was created");

    browser.open_url(other.url()).await;
    browser.click("#log-out").await;
    browser.wait_for_url(&format!("{base}/api/auth/logout")).await;
    let answer = browser.page_text().await;
    assert!(
        answer.contains("cross_origin_request"),
        "the cross-origin logout should be refused as cross_origin_request:\n{answer}"
    );

    // Still signed in, and the same request from the control plane's own page works.
    browser.open_url(&format!("{base}/")).await;
    assert_eq!(
        browser.text_of("#signed-in").await,
        format!("Signed in as {}", registration.email)
    );
    let status = browser
        .execute_async(
            r#"const [body, done] = arguments;
fetch("/api/teams", {method: "POST", headers: {"Content-Type": "application/json"},
  body: JSON.stringify(body)}).then((r) => done(r.status), (e) => done(String(e)));"#,
            vec![json!({"slug": slug, "name": "Own origin"})],
        )
        .await
        .expect("the same-origin fetch runs");
    assert_eq!(status, Value::from(201), "same-origin team creation");
    assert_eq!(teams_with_slug(&cp, &slug).await, 1);

    browser.close().await;
}
