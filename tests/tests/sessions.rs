//! Sessions and credentials: the `instapod_session` cookie and its attributes, fresh tokens
//! at every login (session fixation), logout, expiry, hashed storage, and the same-origin
//! (CSRF) rule for cookie-authenticated changes.

use instapod_tests::checks::SetCookie;
use instapod_tests::ids::unique_slug;
use instapod_tests::{Client, ControlPlane, Response, login, register_user, string_field};
use serde_json::json;

const EVIL_ORIGIN: &str = "http://evil.example";

/// Logs in through `client` (which keeps any cookie it is sent) and returns the response.
async fn login_with(client: &Client, email: &str, password: &str) -> Response {
    client
        .post_json("/api/auth/login", &json!({"email": email, "password": password}))
        .await
}

/// A cookie-jar client logged in as a new user; returns it with the user's email.
async fn cookie_session(cp: &ControlPlane) -> (Client, String) {
    let registration = register_user(cp, "cookie").await;
    let client = cp.cookie_client();
    login_with(&client, &registration.email, &registration.password)
        .await
        .assert_status(200);
    (client, registration.email)
}

async fn team_exists(cp: &ControlPlane, slug: &str) -> bool {
    let db = cp.db().await;
    let count: i64 = db
        .query_one("SELECT count(*) FROM teams WHERE slug = $1", &[&slug])
        .await
        .expect("count teams")
        .get(0);
    count > 0
}

#[tokio::test]
async fn login_sets_a_host_only_http_only_lax_cookie() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "attrs").await;
    let response = login_with(&cp.client(), &registration.email, &registration.password).await;
    let body = response.json_with_status(200);
    let header = response
        .set_cookie("instapod_session")
        .unwrap_or_else(|| panic!("no instapod_session cookie: {:?}", response.header_all("set-cookie")));
    let cookie = SetCookie::parse(&header);
    assert_eq!(cookie.value, string_field(&body, "/token"), "{header}");
    assert!(cookie.has("httponly"), "HttpOnly missing: {header}");
    assert_eq!(
        cookie.get("samesite").map(str::to_ascii_lowercase).as_deref(),
        Some("lax"),
        "{header}"
    );
    assert_eq!(cookie.get("path"), Some("/"), "{header}");
    assert!(!cookie.has("domain"), "the cookie must be host-only: {header}");
    assert!(
        !cookie.has("secure"),
        "plain-http public URL: no Secure attribute: {header}"
    );
    assert!(!cookie.removes_cookie(), "{header}");
}

#[tokio::test]
async fn the_cookie_authenticates_reads() {
    let cp = ControlPlane::start_default().await;
    let (client, email) = cookie_session(&cp).await;
    assert!(client.cookie("instapod_session").is_some());
    let me = client.get_response("/api/auth/user").await.json_with_status(200);
    assert_eq!(me["email"], email.as_str());
    client.get_response("/api/teams").await.assert_status(200);
}

#[tokio::test]
async fn every_login_issues_a_fresh_token_and_ignores_a_planted_cookie() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "fixation").await;
    let planted = format!("ipd_{}", "P".repeat(43));
    let client = cp.cookie_client();
    client.plant_cookie(&format!("instapod_session={planted}"));
    assert_eq!(client.cookie("instapod_session").as_deref(), Some(planted.as_str()));

    let response = login_with(&client, &registration.email, &registration.password).await;
    let token = string_field(&response.json_with_status(200), "/token");
    assert_ne!(token, planted);
    let header = response.set_cookie("instapod_session").expect("login sets the cookie");
    assert_eq!(SetCookie::parse(&header).value, token);
    assert_eq!(client.cookie("instapod_session").as_deref(), Some(token.as_str()));

    // The planted value is worthless, before and after.
    cp.client()
        .with_token(&planted)
        .get_response("/api/auth/user")
        .await
        .assert_error(401, "unauthorized");

    // Two logins, two different tokens, both valid.
    let second = login(&cp, &registration.email, &registration.password).await;
    assert_ne!(second, token);
    for token in [&token, &second] {
        cp.client()
            .with_token(token)
            .get_response("/api/auth/user")
            .await
            .assert_status(200);
    }
    client.get_response("/api/auth/user").await.assert_status(200);
}

#[tokio::test]
async fn logout_revokes_only_the_token_in_use() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "logout").await;
    let first = login(&cp, &registration.email, &registration.password).await;
    let second = login(&cp, &registration.email, &registration.password).await;

    let response = cp.client().with_token(&first).post("/api/auth/logout").send().await;
    response.assert_status(204);
    let cleared = response
        .set_cookie("instapod_session")
        .expect("logout clears the cookie");
    let cleared = SetCookie::parse(&cleared);
    assert!(cleared.value.is_empty() || cleared.value != first, "{cleared:?}");
    assert!(cleared.removes_cookie(), "{cleared:?}");
    assert_eq!(cleared.get("path"), Some("/"));

    cp.client()
        .with_token(&first)
        .get_response("/api/auth/user")
        .await
        .assert_error(401, "unauthorized");
    cp.client()
        .with_token(&first)
        .post("/api/auth/logout")
        .send()
        .await
        .assert_error(401, "unauthorized");
    cp.client()
        .with_token(&second)
        .get_response("/api/auth/user")
        .await
        .assert_status(200);
}

#[tokio::test]
async fn cookie_logout_clears_the_cookie_and_revokes_the_session() {
    let cp = ControlPlane::start_default().await;
    let (client, _) = cookie_session(&cp).await;
    let token = client.cookie("instapod_session").expect("the jar holds the session");
    let response = client.post("/api/auth/logout").header("Origin", cp.url()).send().await;
    response.assert_status(204);
    let cleared = SetCookie::parse(
        &response
            .set_cookie("instapod_session")
            .expect("logout clears the cookie"),
    );
    assert!(cleared.removes_cookie(), "{cleared:?}");
    assert!(
        client.cookie("instapod_session").is_none(),
        "the browser drops the cookie: {:?}",
        client.cookie_header()
    );
    client
        .get_response("/api/auth/user")
        .await
        .assert_error(401, "unauthorized");
    cp.client()
        .with_token(&token)
        .get_response("/api/auth/user")
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn an_expired_session_is_refused() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "expiry").await;
    let token = login(&cp, &registration.email, &registration.password).await;
    let db = cp.db().await;
    db.execute(
        "UPDATE sessions SET expires_at = now() - interval '1 second' WHERE user_id = $1::text::uuid",
        &[&registration.user_id],
    )
    .await
    .expect("expire the session");
    cp.client()
        .with_token(&token)
        .get_response("/api/auth/user")
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn tokens_and_codes_are_stored_only_as_hashes() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "hashes").await;
    let token = login(&cp, &registration.email, &registration.password).await;
    cp.client()
        .post_json("/api/auth/forgot-password", &json!({"email": registration.email}))
        .await
        .assert_status(202);
    let reset = cp
        .latest_token(&registration.email, instapod_tests::MailKind::ResetPassword)
        .await;
    let verify = cp
        .latest_token(&registration.email, instapod_tests::MailKind::VerifyEmail)
        .await;
    let db = cp.db().await;
    for secret in [&token, &reset, &verify] {
        // Neither the text nor its bytes (as Postgres prints bytea, in hex) may appear.
        let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
        let body = &secret[4..];
        for (table, query) in [
            (
                "sessions",
                "SELECT count(*) FROM sessions t WHERE t::text LIKE '%' || $1 || '%' OR t::text LIKE '%' || $2 || '%'",
            ),
            (
                "one_time_codes",
                "SELECT count(*) FROM one_time_codes t WHERE t::text LIKE '%' || $1 || '%' OR t::text LIKE '%' || $2 || '%'",
            ),
        ] {
            let found: i64 = db
                .query_one(query, &[&body, &hex])
                .await
                .expect("search for the secret")
                .get(0);
            assert_eq!(found, 0, "{table} holds the plain secret {secret}");
        }
    }
}

#[tokio::test]
async fn cookie_changes_from_a_foreign_origin_are_refused() {
    let cp = ControlPlane::start_default().await;
    let (client, _) = cookie_session(&cp).await;

    let slug = unique_slug("evil");
    client
        .post("/api/teams")
        .header("Origin", EVIL_ORIGIN)
        .json(&json!({"name": "Evil", "slug": slug}))
        .send()
        .await
        .assert_error(403, "cross_origin_request");
    assert!(!team_exists(&cp, &slug).await, "nothing may change");

    // Without Origin and without Referer: refused as well.
    let slug = unique_slug("bare");
    client
        .post_json("/api/teams", &json!({"name": "Bare", "slug": slug}))
        .await
        .assert_error(403, "cross_origin_request");
    assert!(!team_exists(&cp, &slug).await);

    // A foreign Referer (no Origin): refused.
    let slug = unique_slug("ref");
    client
        .post("/api/teams")
        .header("Referer", "http://evil.example/page")
        .json(&json!({"name": "Ref", "slug": slug}))
        .send()
        .await
        .assert_error(403, "cross_origin_request");
    assert!(!team_exists(&cp, &slug).await);

    // `Origin: null` is foreign too.
    let slug = unique_slug("null");
    client
        .post("/api/teams")
        .header("Origin", "null")
        .json(&json!({"name": "Null", "slug": slug}))
        .send()
        .await
        .assert_error(403, "cross_origin_request");
    assert!(!team_exists(&cp, &slug).await);

    // A look-alike origin (other port, other scheme) is foreign.
    let other_port = format!("{}1", cp.url());
    let https = cp.url().replace("http://", "https://");
    for origin in [other_port.as_str(), https.as_str()] {
        let slug = unique_slug("alike");
        let response = client
            .post("/api/teams")
            .header("Origin", origin)
            .json(&json!({"name": "Alike", "slug": slug}))
            .send()
            .await;
        assert_eq!(
            response.status,
            403,
            "Origin {origin} is not {}: {}",
            cp.url(),
            response.text()
        );
        response.assert_error(403, "cross_origin_request");
        assert!(!team_exists(&cp, &slug).await, "origin {origin}");
    }

    // The control plane's own origin, or a same-origin Referer: allowed.
    let slug = unique_slug("own");
    let created = client
        .post("/api/teams")
        .header("Origin", cp.url())
        .json(&json!({"name": "Own", "slug": slug}))
        .send()
        .await
        .json_with_status(201);
    assert!(team_exists(&cp, &slug).await);
    let team_id = string_field(&created, "/id");
    let slug = unique_slug("ownref");
    client
        .post("/api/teams")
        .header("Referer", &format!("{}/dashboard", cp.url()))
        .json(&json!({"name": "Own ref", "slug": slug}))
        .send()
        .await
        .assert_status(201);

    // PUT and DELETE follow the same rule, and nothing changes when refused.
    client
        .put(&format!("/api/teams/{team_id}"))
        .header("Origin", EVIL_ORIGIN)
        .json(&json!({"name": "Renamed by evil"}))
        .send()
        .await
        .assert_error(403, "cross_origin_request");
    client
        .delete(&format!("/api/teams/{team_id}"))
        .header("Origin", EVIL_ORIGIN)
        .send()
        .await
        .assert_error(403, "cross_origin_request");
    let team = client
        .get_response(&format!("/api/teams/{team_id}"))
        .await
        .json_with_status(200);
    assert_eq!(team["name"], "Own");

    // Logout is a change too: refused from a foreign origin, the session survives.
    client
        .post("/api/auth/logout")
        .header("Origin", EVIL_ORIGIN)
        .send()
        .await
        .assert_error(403, "cross_origin_request");
    client.get_response("/api/auth/user").await.assert_status(200);

    // Reads are not affected.
    client
        .get("/api/teams")
        .header("Origin", EVIL_ORIGIN)
        .send()
        .await
        .assert_status(200);
}

#[tokio::test]
async fn bearer_requests_are_not_subject_to_the_cookie_rule() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "bearer").await;
    let token = login(&cp, &registration.email, &registration.password).await;
    let client = cp.client().with_token(&token);
    let slug = unique_slug("bearer");
    client
        .post_json("/api/teams", &json!({"name": "Bearer", "slug": slug}))
        .await
        .assert_status(201);
    assert!(team_exists(&cp, &slug).await);

    // A foreign Origin is refused whatever the credential.
    let slug = unique_slug("bearer-evil");
    client
        .post("/api/teams")
        .header("Origin", EVIL_ORIGIN)
        .json(&json!({"name": "Bearer evil", "slug": slug}))
        .send()
        .await
        .assert_error(403, "cross_origin_request");
    assert!(!team_exists(&cp, &slug).await);
}

#[tokio::test]
async fn login_from_a_foreign_origin_is_refused() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "logincsrf").await;
    let response = cp
        .client()
        .post("/api/auth/login")
        .header("Origin", EVIL_ORIGIN)
        .json(&json!({"email": registration.email, "password": registration.password}))
        .send()
        .await;
    response.assert_error(403, "cross_origin_request");
    assert!(response.set_cookie("instapod_session").is_none());
}

/// Session lookups of concurrent requests are batched into one query: each request must still
/// get its own caller, repeated tokens in one batch included, and a token revoked while others
/// are in flight must be refused from then on.
#[tokio::test]
async fn concurrent_requests_each_get_their_own_caller() {
    let cp = ControlPlane::start_default().await;
    let alice = instapod_tests::register_and_login(&cp).await;
    let bob = instapod_tests::register_and_login(&cp).await;
    let mut requests = Vec::new();
    for i in 0..120 {
        let user = if i % 3 == 0 { &bob } else { &alice };
        let client = user.client();
        let expected = user.email.clone();
        requests.push(tokio::spawn(async move {
            let me = client.get_response("/api/auth/user").await.json_with_status(200);
            assert_eq!(me["email"], expected.as_str(), "{me}");
        }));
    }
    for request in requests {
        request.await.expect("request task");
    }

    alice.client().post("/api/auth/logout").send().await.assert_status(204);
    let mut requests = Vec::new();
    for i in 0..60 {
        let (client, status) = if i % 2 == 0 {
            (alice.client(), 401)
        } else {
            (bob.client(), 200)
        };
        requests.push(tokio::spawn(async move {
            client.get_response("/api/auth/user").await.assert_status(status);
        }));
    }
    for request in requests {
        request.await.expect("request task");
    }
}
