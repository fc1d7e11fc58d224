//! Per-IP rate limits of the spec (login 5/min, register 3/min, forgot-password 3/min):
//! `429 rate_limited` with `Retry-After`, separate buckets per client IP, `X-Forwarded-For`
//! believed only from trusted proxies, limits shared by replicas, and failing closed with
//! `503 rate_limiter_unavailable` when Redis is down.
//!
//! Client IPs are random `X-Forwarded-For` values, so tests sharing a Redis server never share
//! a bucket; the test without trusted proxies has its own control plane and Redis database.

use std::time::Duration;

use anyhow::anyhow;
use instapod_tests::ids::{random_client_ip, unique_email};
use instapod_tests::{
    Client, ControlPlane, ControlPlaneOptions, RedisServer, Response, eventually, login, register_user,
};
use serde_json::json;

fn assert_rate_limited(response: &Response) {
    response.assert_error(429, "rate_limited");
    let retry_after = response
        .header("retry-after")
        .unwrap_or_else(|| panic!("429 without Retry-After: {:?}", response.headers));
    let seconds: u64 = retry_after
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After is not a number of seconds: {retry_after:?}"));
    assert!(
        (1..=60).contains(&seconds),
        "Retry-After {seconds} outside the one-minute window"
    );
}

async fn attempt_login(client: &Client, email: &str, password: &str) -> Response {
    client
        .post_json("/api/auth/login", &json!({"email": email, "password": password}))
        .await
}

#[tokio::test]
async fn login_allows_five_per_minute_per_ip() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "limited").await;
    let client = cp.client();
    // Failed and successful attempts count alike.
    for attempt in 0..5 {
        let password = if attempt % 2 == 0 {
            "wrong password"
        } else {
            registration.password.as_str()
        };
        let response = attempt_login(&client, &registration.email, password).await;
        assert!(
            matches!(response.status, 200 | 401),
            "attempt {} answered {}: {}",
            attempt + 1,
            response.status,
            response.text()
        );
    }
    let sixth = attempt_login(&client, &registration.email, &registration.password).await;
    assert_rate_limited(&sixth);
    assert!(sixth.set_cookie("instapod_session").is_none());

    // Another client IP has its own bucket.
    let other = client.with_client_ip(Some(&random_client_ip()));
    attempt_login(&other, &registration.email, &registration.password)
        .await
        .assert_status(200);
    // The first one is still limited.
    assert_rate_limited(&attempt_login(&client, &registration.email, &registration.password).await);
}

#[tokio::test]
async fn register_allows_three_per_minute_per_ip() {
    let cp = ControlPlane::start_default().await;
    let client = cp.client();
    for _ in 0..3 {
        client
            .post_json(
                "/api/auth/register",
                &json!({"email": unique_email("burst"), "password": "long enough", "name": "B"}),
            )
            .await
            .assert_status(201);
    }
    let email = unique_email("fourth");
    let fourth = client
        .post_json(
            "/api/auth/register",
            &json!({"email": email, "password": "long enough", "name": "B"}),
        )
        .await;
    assert_rate_limited(&fourth);
    let db = cp.db().await;
    let created: i64 = db
        .query_one("SELECT count(*) FROM users WHERE email = $1", &[&email])
        .await
        .expect("count users")
        .get(0);
    assert_eq!(created, 0, "a limited registration creates nothing");

    cp.client()
        .post_json(
            "/api/auth/register",
            &json!({"email": email, "password": "long enough", "name": "B"}),
        )
        .await
        .assert_status(201);
}

#[tokio::test]
async fn forgot_password_allows_three_per_minute_per_ip() {
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "forgetful").await;
    let client = cp.client();
    for _ in 0..3 {
        client
            .post_json("/api/auth/forgot-password", &json!({"email": registration.email}))
            .await
            .assert_status(202);
    }
    assert_rate_limited(
        &client
            .post_json("/api/auth/forgot-password", &json!({"email": registration.email}))
            .await,
    );
    // Unknown emails are limited the same way (no difference to observe).
    assert_rate_limited(
        &client
            .post_json("/api/auth/forgot-password", &json!({"email": unique_email("ghost")}))
            .await,
    );
    cp.client()
        .post_json("/api/auth/forgot-password", &json!({"email": registration.email}))
        .await
        .assert_status(202);
}

#[tokio::test]
async fn forwarded_for_is_ignored_without_trusted_proxies() {
    let cp = ControlPlane::start(ControlPlaneOptions::default().without_trusted_proxies()).await;
    // Registration is limited too, and all of this comes from 127.0.0.1: one account.
    let registration = register_user(&cp, "direct").await;
    for _ in 0..5 {
        // Each attempt claims another address; none of that is believed.
        let client = cp.client();
        attempt_login(&client, &registration.email, "wrong password")
            .await
            .assert_error(401, "invalid_credentials");
    }
    let spoofed = cp.client();
    assert_rate_limited(&attempt_login(&spoofed, &registration.email, &registration.password).await);
    let chain = cp
        .client()
        .with_client_ip(Some(&format!("{}, {}", random_client_ip(), random_client_ip())));
    assert_rate_limited(&attempt_login(&chain, &registration.email, &registration.password).await);
    let plain = cp.client().with_client_ip(None);
    assert_rate_limited(&attempt_login(&plain, &registration.email, &registration.password).await);
}

#[tokio::test]
async fn the_limit_holds_across_replicas() {
    // Two replicas: one database, one Redis database.
    let database = instapod_tests::postgres::shared().create_database().await;
    let redis_url = instapod_tests::redis::shared().next_url();
    let options = ControlPlaneOptions::default().database(&database).redis_url(&redis_url);
    let replica_a = ControlPlane::start(options.clone()).await;
    let replica_b = ControlPlane::start(options).await;
    let registration = register_user(&replica_a, "replicas").await;
    let ip = random_client_ip();
    let via_a = replica_a.client().with_client_ip(Some(&ip));
    let via_b = replica_b.client().with_client_ip(Some(&ip));
    for round in 0..5 {
        let client = if round % 2 == 0 { &via_a } else { &via_b };
        attempt_login(client, &registration.email, &registration.password)
            .await
            .assert_status(200);
    }
    assert_rate_limited(&attempt_login(&via_a, &registration.email, &registration.password).await);
    assert_rate_limited(&attempt_login(&via_b, &registration.email, &registration.password).await);
}

#[tokio::test]
async fn redis_down_fails_closed() {
    let redis = RedisServer::start();
    let cp = ControlPlane::start(ControlPlaneOptions::default().redis(&redis)).await;
    let registration = register_user(&cp, "redisdown").await;
    let token = login(&cp, &registration.email, &registration.password).await;

    redis.stop();

    let email = registration.email.as_str();
    let password = registration.password.as_str();
    let cp_ref = &cp;
    let response = eventually(Duration::from_secs(30), "login to answer 503", || async move {
        let response = attempt_login(&cp_ref.client(), email, password).await;
        if response.status == 503 {
            Ok(response)
        } else {
            Err(anyhow!("answered {}: {}", response.status, response.text()))
        }
    })
    .await;
    response.assert_error(503, "rate_limiter_unavailable");
    assert!(response.set_cookie("instapod_session").is_none());

    cp.client()
        .post_json(
            "/api/auth/register",
            &json!({"email": unique_email("during"), "password": "long enough", "name": "D"}),
        )
        .await
        .assert_error(503, "rate_limiter_unavailable");
    cp.client()
        .post_json("/api/auth/forgot-password", &json!({"email": email}))
        .await
        .assert_error(503, "rate_limiter_unavailable");

    // Endpoints without a limit keep working.
    cp.client()
        .with_token(&token)
        .get_response("/api/auth/user")
        .await
        .assert_status(200);
    let ready = cp.client().get_response("/readyz").await;
    let body = ready.json_with_status(503);
    assert_eq!(body["postgres"], "ok", "{body}");
    assert_ne!(body["redis"], "ok", "{body}");
}

#[tokio::test]
async fn prepended_forwarded_for_entries_do_not_open_a_new_bucket() {
    // Behind a trusted proxy the proxy appends the real client address; whatever the client
    // put before it is not believed.
    let cp = ControlPlane::start_default().await;
    let registration = register_user(&cp, "prepend").await;
    let real_ip = random_client_ip();
    let via_proxy = || {
        cp.client()
            .with_client_ip(Some(&format!("{}, {real_ip}", random_client_ip())))
    };
    for _ in 0..5 {
        attempt_login(&via_proxy(), &registration.email, "wrong password")
            .await
            .assert_error(401, "invalid_credentials");
    }
    assert_rate_limited(&attempt_login(&via_proxy(), &registration.email, &registration.password).await);
    let direct = cp.client().with_client_ip(Some(&real_ip));
    assert_rate_limited(&attempt_login(&direct, &registration.email, &registration.password).await);
}
