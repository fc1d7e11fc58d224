//! Accounts: registration, login, the current user, email verification and password reset,
//! plus the request-body rules (JSON only, 64 KiB, unknown fields refused) on these endpoints.
//!
//! Every request that is rate limited per IP (register, login, forgot-password) comes from a
//! fresh client (`cp.client()`), which has its own random `X-Forwarded-For` address.

use instapod_tests::checks::{assert_timestamp, assert_uuid};
use instapod_tests::ids::{password_of_len, random_suffix, unique_email};
use instapod_tests::{ControlPlane, MailKind, login, register_and_login, register_user, string_field, verify_email};
use serde_json::{Value, json};

async fn register(cp: &ControlPlane, email: &str, password: &str, name: &str) -> instapod_tests::Response {
    cp.client()
        .post_json(
            "/api/auth/register",
            &json!({"email": email, "password": password, "name": name}),
        )
        .await
}

async fn try_login(cp: &ControlPlane, email: &str, password: &str) -> instapod_tests::Response {
    cp.client()
        .post_json("/api/auth/login", &json!({"email": email, "password": password}))
        .await
}

fn assert_user_shape(user: &Value, email: &str) {
    assert_uuid(&user["id"], "user.id");
    assert_eq!(user["email"], email, "user.email in {user}");
    assert!(user["name"].is_string(), "user.name in {user}");
    assert!(user["email_verified"].is_boolean(), "user.email_verified in {user}");
    assert_timestamp(&user["created_at"], "user.created_at");
    assert_uuid(&user["active_team_id"], "user.active_team_id");
}

#[tokio::test]
async fn register_creates_user_and_personal_team_without_logging_in() {
    let cp = ControlPlane::start_default().await;
    let email = unique_email("reg");
    let response = register(&cp, &email, "correct horse battery", "Reg Tester").await;
    let body = response.json_with_status(201);
    assert!(
        response.set_cookie("instapod_session").is_none(),
        "registration must not log in: {:?}",
        response.header_all("set-cookie")
    );
    assert!(
        body.get("token").is_none(),
        "registration must not return a token: {body}"
    );

    let user = &body["user"];
    assert_user_shape(user, &email);
    assert_eq!(user["name"], "Reg Tester");
    assert_eq!(user["email_verified"], false);

    let team = &body["team"];
    let team_id = assert_uuid(&team["id"], "team.id");
    assert_eq!(user["active_team_id"], team_id.as_str());
    assert_eq!(team["personal"], true);
    assert_eq!(team["role"], "owner");
    assert_eq!(team["member_count"], 1);
    assert!(team["name"].as_str().is_some_and(|n| !n.is_empty()), "{team}");
    assert!(team["slug"].as_str().is_some_and(|s| !s.is_empty()), "{team}");
    assert_timestamp(&team["created_at"], "team.created_at");

    // The verification mail is queued with a link to this control plane.
    let token = cp.latest_token(&email, MailKind::VerifyEmail).await;
    assert!(token.len() >= 4 + 43, "a 256-bit code, got {token:?}");

    // The password is not stored in plain text anywhere in the users row.
    let db = cp.db().await;
    let leaked: i64 = db
        .query_one(
            "SELECT count(*) FROM users u WHERE u::text LIKE '%' || $1 || '%'",
            &[&"correct horse battery"],
        )
        .await
        .expect("query users")
        .get(0);
    assert_eq!(leaked, 0, "the plain password must not be stored");
}

#[tokio::test]
async fn register_normalises_email_and_refuses_duplicates() {
    let cp = ControlPlane::start_default().await;
    let local = format!("Foo-{}", random_suffix());
    let messy = format!("  {local}@Example.COM ");
    let normalised = format!("{}@example.com", local.to_lowercase());

    let body = register(&cp, &messy, "password-one", "Foo").await.json_with_status(201);
    assert_eq!(body["user"]["email"], normalised.as_str());

    let duplicate = register(
        &cp,
        &format!("{}@EXAMPLE.com", local.to_uppercase()),
        "password-two",
        "Foo2",
    )
    .await;
    duplicate.assert_error(409, "email_taken");
    let exact = register(&cp, &normalised, "password-two", "Foo2").await;
    exact.assert_error(409, "email_taken");

    // The account can log in with the normalised address.
    let token = login(&cp, &normalised, "password-one").await;
    assert!(token.starts_with("ipd_"), "{token}");
    let db = cp.db().await;
    let rows: i64 = db
        .query_one("SELECT count(*) FROM users WHERE lower(email) = $1", &[&normalised])
        .await
        .expect("count users")
        .get(0);
    assert_eq!(rows, 1, "exactly one account for the address");
}

#[tokio::test]
async fn register_validates_fields() {
    let cp = ControlPlane::start_default().await;
    let cases: Vec<(&str, Value)> = vec![
        (
            "7-character password",
            json!({"email": unique_email("v"), "password": "1234567", "name": "V"}),
        ),
        (
            "1025-character password",
            json!({"email": unique_email("v"), "password": password_of_len(1025), "name": "V"}),
        ),
        (
            "email without @",
            json!({"email": "not-an-email", "password": "long enough", "name": "V"}),
        ),
        (
            "empty email",
            json!({"email": "   ", "password": "long enough", "name": "V"}),
        ),
        (
            "empty name",
            json!({"email": unique_email("v"), "password": "long enough", "name": ""}),
        ),
        (
            "101-character name",
            json!({"email": unique_email("v"), "password": "long enough", "name": "n".repeat(101)}),
        ),
    ];
    for (what, body) in cases {
        let response = cp.client().post_json("/api/auth/register", &body).await;
        let message = response.assert_error(400, "validation_failed");
        assert!(!message.is_empty(), "{what}");
    }
    // Boundaries that must be accepted.
    register(&cp, &unique_email("v8"), "12345678", "V")
        .await
        .assert_status(201);
    register(&cp, &unique_email("v1024"), &password_of_len(1024), &"n".repeat(100))
        .await
        .assert_status(201);

    // Missing and unknown fields are JSON problems.
    for body in [
        json!({"email": unique_email("v"), "password": "long enough"}),
        json!({"email": unique_email("v"), "password": "long enough", "name": "V", "admin": true}),
    ] {
        cp.client()
            .post_json("/api/auth/register", &body)
            .await
            .assert_error(400, "invalid_json");
    }
}

#[tokio::test]
async fn passwords_are_never_truncated() {
    let cp = ControlPlane::start_default().await;
    for length in [64, 200] {
        let email = unique_email(&format!("len{length}"));
        let password = password_of_len(length);
        register(&cp, &email, &password, "Long").await.assert_status(201);
        let token = login(&cp, &email, &password).await;
        assert!(token.starts_with("ipd_"));

        if length == 200 {
            // Differs only in the 100th character.
            let mut altered: Vec<char> = password.chars().collect();
            altered[99] = if altered[99] == 'x' { 'y' } else { 'x' };
            let altered: String = altered.into_iter().collect();
            try_login(&cp, &email, &altered)
                .await
                .assert_error(401, "invalid_credentials");
            // A prefix (what a bcrypt-style 72-byte cut would compare) is not enough either.
            try_login(&cp, &email, &password[..72])
                .await
                .assert_error(401, "invalid_credentials");
            // Nor is the password with something appended.
            try_login(&cp, &email, &format!("{password}z"))
                .await
                .assert_error(401, "invalid_credentials");
        }
    }
}

#[tokio::test]
async fn request_bodies_must_be_small_well_formed_json() {
    let cp = ControlPlane::start_default().await;
    for path in ["/api/auth/register", "/api/auth/login", "/api/auth/forgot-password"] {
        cp.client()
            .post(path)
            .raw_body("application/json", "{\"email\": ")
            .send()
            .await
            .assert_error(400, "invalid_json");
        cp.client()
            .post(path)
            .raw_body("application/json", "{\"email\": \"a@b.example\", \"surprise\": 1}")
            .send()
            .await
            .assert_error(400, "invalid_json");
        cp.client()
            .post(path)
            .raw_body(
                "text/plain",
                "{\"email\": \"a@b.example\", \"password\": \"long enough\", \"name\": \"x\"}",
            )
            .send()
            .await
            .assert_error(415, "unsupported_media_type");
        cp.client()
            .post(path)
            .raw_body("application/x-www-form-urlencoded", "email=a%40b.example")
            .send()
            .await
            .assert_error(415, "unsupported_media_type");
        let huge = format!(
            "{{\"email\": \"a@b.example\", \"password\": \"{}\", \"name\": \"x\"}}",
            "p".repeat(100 * 1024)
        );
        cp.client()
            .post(path)
            .raw_body("application/json", huge)
            .send()
            .await
            .assert_error(413, "payload_too_large");
    }
    // An empty body is not JSON; a charset parameter on the content type is fine.
    cp.client()
        .post("/api/auth/register")
        .raw_body("application/json", "")
        .send()
        .await
        .assert_error(400, "invalid_json");
    let charset_email = unique_email("charset");
    let body = json!({"email": charset_email, "password": "long enough", "name": "C"});
    let created = cp
        .client()
        .post("/api/auth/register")
        .raw_body("application/json; charset=utf-8", body.to_string())
        .send()
        .await;
    created.assert_status(201);
    // Nothing else was created by any of these.
    let db = cp.db().await;
    let others: i64 = db
        .query_one("SELECT count(*) FROM users WHERE email <> $1", &[&charset_email])
        .await
        .expect("count users")
        .get(0);
    assert_eq!(others, 0);
}

#[tokio::test]
async fn login_returns_token_user_and_expiry() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "login").await;
    let response = try_login(&cp, &registration.email, &registration.password).await;
    let body = response.json_with_status(200);
    let token = string_field(&body, "/token");
    assert!(
        token.starts_with("ipd_") && token.len() == 4 + 43,
        "token must be ipd_ + 43 base64url characters: {token:?}"
    );
    assert!(
        token[4..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "{token}"
    );
    assert_timestamp(&body["expires_at"], "expires_at");
    assert_user_shape(&body["user"], &registration.email);
    assert_eq!(body["user"]["id"], registration.user_id.as_str());
    assert_eq!(body["user"]["active_team_id"], registration.personal_team_id.as_str());

    let me = cp
        .client()
        .with_token(&token)
        .get_response("/api/auth/user")
        .await
        .json_with_status(200);
    assert_user_shape(&me, &registration.email);
    assert_eq!(me["id"], registration.user_id.as_str());
    assert_eq!(me["name"], registration.name.as_str());
    assert_eq!(me["active_team_id"], registration.personal_team_id.as_str());
}

#[tokio::test]
async fn login_failures_do_not_reveal_whether_the_account_exists() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "fail").await;
    let wrong_password = try_login(&cp, &registration.email, "not the password").await;
    let wrong_message = wrong_password.assert_error(401, "invalid_credentials");
    let unknown = try_login(&cp, &unique_email("nobody"), "not the password").await;
    let unknown_message = unknown.assert_error(401, "invalid_credentials");
    assert_eq!(wrong_password.json(), unknown.json(), "identical bodies");
    assert_eq!(wrong_message, unknown_message);
    assert!(wrong_password.set_cookie("instapod_session").is_none());

    // Validation of the login body is JSON-level only.
    cp.client()
        .post_json("/api/auth/login", &json!({"email": registration.email}))
        .await
        .assert_error(400, "invalid_json");
}

#[tokio::test]
async fn current_user_requires_a_valid_token() {
    let cp = ControlPlane::start_default().await;
    cp.client()
        .get_response("/api/auth/user")
        .await
        .assert_error(401, "unauthorized");
    let made_up = format!("ipd_{}", "A".repeat(43));
    for token in ["garbage", made_up.as_str(), ""] {
        cp.client()
            .get("/api/auth/user")
            .header("Authorization", &format!("Bearer {token}"))
            .send()
            .await
            .assert_error(401, "unauthorized");
    }
    cp.client()
        .get("/api/auth/user")
        .header("Cookie", &format!("instapod_session={made_up}"))
        .send()
        .await
        .assert_error(401, "unauthorized");
    // Logout needs authentication too.
    cp.client()
        .post("/api/auth/logout")
        .send()
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test]
async fn verify_email_marks_the_address_verified_once() {
    let cp = ControlPlane::start_default().await;
    let user = register_and_login(&cp).await;
    let before = user.client().get_response("/api/auth/user").await.json_with_status(200);
    assert_eq!(before["email_verified"], false);

    let token = cp.latest_token(&user.email, MailKind::VerifyEmail).await;
    assert!(token.starts_with("ipv_"));
    let verified = cp
        .client()
        .post_json("/api/auth/verify-email", &json!({"token": token}))
        .await
        .json_with_status(200);
    assert_user_shape(&verified, &user.email);
    assert_eq!(verified["email_verified"], true);
    assert_eq!(verified["id"], user.user_id.as_str());

    let after = user.client().get_response("/api/auth/user").await.json_with_status(200);
    assert_eq!(after["email_verified"], true);

    // Single use.
    cp.client()
        .post_json("/api/auth/verify-email", &json!({"token": token}))
        .await
        .assert_error(400, "invalid_token");
    // Unknown codes, and codes of the wrong kind.
    for bad in ["garbage".to_string(), format!("ipv_{}", "A".repeat(43)), String::new()] {
        cp.client()
            .post_json("/api/auth/verify-email", &json!({"token": bad}))
            .await
            .assert_error(400, "invalid_token");
    }
    cp.client()
        .post_json("/api/auth/verify-email", &json!({}))
        .await
        .assert_error(400, "invalid_json");
}

#[tokio::test]
async fn a_reset_code_does_not_verify_email() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "kind").await;
    cp.client()
        .post_json("/api/auth/forgot-password", &json!({"email": registration.email}))
        .await
        .assert_status(202);
    let reset_token = cp.latest_token(&registration.email, MailKind::ResetPassword).await;
    cp.client()
        .post_json("/api/auth/verify-email", &json!({"token": reset_token}))
        .await
        .assert_error(400, "invalid_token");
    // And a verify code does not reset a password.
    let verify_token = cp.latest_token(&registration.email, MailKind::VerifyEmail).await;
    cp.client()
        .post_json(
            "/api/auth/reset-password",
            &json!({"token": verify_token, "password": "brand new password"}),
        )
        .await
        .assert_error(400, "invalid_token");
    // Both are still usable for their own purpose.
    verify_email(&cp, &registration.email).await;
    cp.client()
        .post_json(
            "/api/auth/reset-password",
            &json!({"token": reset_token, "password": "brand new password"}),
        )
        .await
        .assert_status(200);
}

#[tokio::test]
async fn forgot_password_answers_the_same_for_unknown_emails() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "forgot").await;
    let unknown_email = unique_email("ghost");

    let known = cp
        .client()
        .post_json("/api/auth/forgot-password", &json!({"email": registration.email}))
        .await;
    let unknown = cp
        .client()
        .post_json("/api/auth/forgot-password", &json!({"email": unknown_email}))
        .await;
    let known_body = known.json_with_status(202);
    let unknown_body = unknown.json_with_status(202);
    assert_eq!(known_body, unknown_body);
    assert!(known_body["message"].as_str().is_some_and(|m| !m.is_empty()));

    // Only the real account gets mail.
    cp.latest_token(&registration.email, MailKind::ResetPassword).await;
    assert_eq!(cp.mail_count(&unknown_email, MailKind::ResetPassword).await, 0);

    cp.client()
        .post_json("/api/auth/forgot-password", &json!({"email": "nope"}))
        .await
        .assert_error(400, "validation_failed");
}

#[tokio::test]
async fn reset_password_changes_it_and_signs_out_everywhere() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "reset").await;
    let first = login(&cp, &registration.email, &registration.password).await;
    let second = login(&cp, &registration.email, &registration.password).await;
    assert_ne!(first, second);

    cp.client()
        .post_json("/api/auth/forgot-password", &json!({"email": registration.email}))
        .await
        .assert_status(202);
    let code = cp.latest_token(&registration.email, MailKind::ResetPassword).await;
    assert!(code.starts_with("ipr_"));

    // A too-short new password is refused (and the code is not spent on it).
    cp.client()
        .post_json("/api/auth/reset-password", &json!({"token": code, "password": "short"}))
        .await
        .assert_error(400, "validation_failed");

    let new_password = "a completely new password";
    let body = cp
        .client()
        .post_json(
            "/api/auth/reset-password",
            &json!({"token": code, "password": new_password}),
        )
        .await
        .json_with_status(200);
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));

    for token in [&first, &second] {
        cp.client()
            .with_token(token)
            .get_response("/api/auth/user")
            .await
            .assert_error(401, "unauthorized");
    }
    try_login(&cp, &registration.email, &registration.password)
        .await
        .assert_error(401, "invalid_credentials");
    let fresh = login(&cp, &registration.email, new_password).await;
    cp.client()
        .with_token(&fresh)
        .get_response("/api/auth/user")
        .await
        .assert_status(200);

    // Single use, and garbage is refused the same way.
    cp.client()
        .post_json(
            "/api/auth/reset-password",
            &json!({"token": code, "password": "yet another password"}),
        )
        .await
        .assert_error(400, "invalid_token");
    for bad in ["garbage".to_string(), format!("ipr_{}", "A".repeat(43))] {
        cp.client()
            .post_json(
                "/api/auth/reset-password",
                &json!({"token": bad, "password": "yet another password"}),
            )
            .await
            .assert_error(400, "invalid_token");
    }
    // The reused code changed nothing.
    login(&cp, &registration.email, new_password).await;
}

#[tokio::test]
async fn an_expired_reset_code_is_refused() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "expired").await;
    cp.client()
        .post_json("/api/auth/forgot-password", &json!({"email": registration.email}))
        .await
        .assert_status(202);
    let code = cp.latest_token(&registration.email, MailKind::ResetPassword).await;
    let db = cp.db().await;
    let updated = db
        .execute(
            "UPDATE one_time_codes SET expires_at = now() - interval '1 minute' \
             WHERE purpose = 'reset_password' AND user_id = $1::text::uuid",
            &[&registration.user_id],
        )
        .await
        .expect("expire the code");
    assert_eq!(updated, 1);
    cp.client()
        .post_json(
            "/api/auth/reset-password",
            &json!({"token": code, "password": "a new password"}),
        )
        .await
        .assert_error(400, "invalid_token");
    login(&cp, &registration.email, &registration.password).await;
}

#[tokio::test]
async fn codes_expire_after_the_documented_lifetimes() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "lifetime").await;
    cp.client()
        .post_json("/api/auth/forgot-password", &json!({"email": registration.email}))
        .await
        .assert_status(202);
    cp.latest_token(&registration.email, MailKind::ResetPassword).await;
    let db = cp.db().await;
    // Lifetimes in minutes: verify codes 48 hours, reset codes 1 hour.
    for (purpose, minutes) in [("verify_email", 48 * 60), ("reset_password", 60)] {
        let row = db
            .query_one(
                "SELECT (extract(epoch FROM expires_at - created_at) / 60)::float8 \
                 FROM one_time_codes WHERE user_id = $1::text::uuid AND purpose = $2",
                &[&registration.user_id, &purpose],
            )
            .await
            .unwrap_or_else(|err| panic!("one {purpose} code: {err}"));
        let lifetime: f64 = row.get(0);
        assert!(
            (lifetime - f64::from(minutes)).abs() <= 1.0,
            "{purpose} codes live {lifetime} minutes, expected {minutes}"
        );
    }
}

#[tokio::test]
async fn concurrent_registrations_of_one_email_create_one_account() {
    let cp = ControlPlane::start_default().await;
    let email = unique_email("race");
    let upper = email.to_uppercase();
    let padded = format!(" {email} ");
    let (a, b, c, d) = tokio::join!(
        register(&cp, &email, "password-a", "A"),
        register(&cp, &email, "password-b", "B"),
        register(&cp, &upper, "password-c", "C"),
        register(&cp, &padded, "password-d", "D"),
    );
    let mut created = 0;
    for response in [&a, &b, &c, &d] {
        if response.status == 201 {
            created += 1;
        } else {
            response.assert_error(409, "email_taken");
        }
    }
    assert_eq!(created, 1, "exactly one registration wins");
    let db = cp.db().await;
    let accounts: i64 = db
        .query_one("SELECT count(*) FROM users WHERE email = $1", &[&email])
        .await
        .expect("count users")
        .get(0);
    assert_eq!(accounts, 1);
    let personal_teams: i64 = db
        .query_one("SELECT count(*) FROM teams WHERE personal", &[])
        .await
        .expect("count teams")
        .get(0);
    assert_eq!(personal_teams, 1, "losers leave no personal team behind");
}
