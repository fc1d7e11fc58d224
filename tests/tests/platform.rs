//! Operational endpoints and cross-cutting behaviour: health and readiness, Prometheus
//! metrics with bounded route labels, the OpenAPI document, JSON errors for unknown paths, mail
//! delivery over SMTP, and the answer when Postgres is down.

use std::time::Duration;

use anyhow::{anyhow, ensure};
use instapod_tests::{
    ControlPlane, ControlPlaneOptions, MailKind, PostgresServer, SmtpSink, eventually, register_and_login,
    register_user,
};
use serde_json::{Value, json};
use uuid::Uuid;

#[tokio::test]
async fn health_and_readiness() {
    let cp = ControlPlane::start_default().await;
    let health = cp.client().get_response("/healthz").await.json_with_status(200);
    assert_eq!(health, json!({"status": "ok"}));
    let ready = cp.client().get_response("/readyz").await.json_with_status(200);
    assert_eq!(ready, json!({"postgres": "ok", "redis": "ok"}));
}

/// The `instapod_control_plane_http_requests_total` lines of a metrics page.
fn request_counter_lines(page: &str) -> Vec<String> {
    page.lines()
        .filter(|line| line.starts_with("instapod_control_plane_http_requests_total{"))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn metrics_label_requests_by_route_template() {
    let cp = ControlPlane::start_default().await;
    let user = register_and_login(&cp).await;
    let client = user.client();
    client.get_response("/api/auth/user").await.assert_status(200);
    let unknown_team = Uuid::new_v4().to_string();
    client
        .get_response(&format!("/api/teams/{unknown_team}"))
        .await
        .assert_status(404);
    client
        .get_response(&format!("/api/teams/{}", user.personal_team_id))
        .await
        .assert_status(200);
    let junk_path = format!("/no/such/{}", Uuid::new_v4().simple());
    cp.client().get_response(&junk_path).await.assert_status(404);

    let response = cp.client().get_response("/metrics").await;
    response.assert_status(200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{:?}",
        response.header("content-type")
    );
    let page = response.text();
    let lines = request_counter_lines(&page);
    assert!(
        lines.iter().any(|l| l.contains("route=\"/api/auth/user\"")),
        "no counter for /api/auth/user in:\n{}",
        lines.join("\n")
    );
    assert!(
        lines.iter().any(|l| l.contains("route=\"/api/teams/{id}\"")),
        "no counter for the template /api/teams/{{id}} in:\n{}",
        lines.join("\n")
    );
    for secret in [&unknown_team, &user.personal_team_id, &junk_path] {
        assert!(
            !page.contains(secret.as_str()),
            "the metrics page contains the raw path part {secret}"
        );
    }
    // Every request counter has method, route and status labels.
    for line in &lines {
        for label in ["method=\"", "route=\"", "status=\""] {
            assert!(line.contains(label), "{line} lacks {label}");
        }
    }
}

#[tokio::test]
async fn openapi_lists_every_implemented_path() {
    let cp = ControlPlane::start_default().await;
    let doc = cp
        .client()
        .get_response("/api/openapi.json")
        .await
        .json_with_status(200);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')),
        "openapi version: {}",
        doc["openapi"]
    );
    let paths = doc["paths"]
        .as_object()
        .unwrap_or_else(|| panic!("no paths object in the document"));
    let expected: &[(&str, &[&str])] = &[
        ("/api/auth/register", &["post"]),
        ("/api/auth/login", &["post"]),
        ("/api/auth/logout", &["post"]),
        ("/api/auth/user", &["get"]),
        ("/api/auth/forgot-password", &["post"]),
        ("/api/auth/reset-password", &["post"]),
        ("/api/auth/verify-email", &["post"]),
        ("/api/teams", &["get", "post"]),
        ("/api/teams/switch", &["post"]),
        ("/api/teams/{id}", &["get", "put", "delete"]),
        ("/api/teams/{id}/members", &["get", "post"]),
        ("/api/teams/{id}/members/{uid}", &["delete"]),
        ("/api/plans", &["get"]),
        ("/api/presets", &["get"]),
        ("/api/regions", &["get"]),
        ("/api/runtimes", &["get"]),
        ("/api/pods/{name}/files", &["get", "delete"]),
        ("/api/pods/{name}/files/content", &["get", "put"]),
        ("/api/pods/{name}/files/upload", &["post"]),
        ("/api/pods/{name}/folders", &["post"]),
        ("/api/pods/{name}/domains", &["get", "post"]),
        ("/api/pods/{name}/domains/{id}", &["delete"]),
        ("/api/pods/{name}/domains/{id}/verify", &["post"]),
    ];
    let mut missing = Vec::new();
    for (path, methods) in expected {
        for method in *methods {
            if paths.get(*path).and_then(|item| item.get(*method)).is_none() {
                missing.push(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "missing from /api/openapi.json: {missing:?}; has {:?}",
        paths.keys().collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_json_errors() {
    let cp = ControlPlane::start_default().await;
    for path in ["/nope", "/api/nope", "/api/teams/switch/extra/deep"] {
        cp.client().get_response(path).await.assert_error(404, "not_found");
    }
    // A method the path does not support.
    let response = cp.client().delete_response("/api/auth/login").await;
    assert!(
        matches!(response.status, 404 | 405),
        "DELETE /api/auth/login answered {}",
        response.status
    );
    let body: Value = response.json();
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test]
async fn verification_mail_is_delivered_over_smtp() {
    let sink = SmtpSink::start().await;
    let cp = ControlPlane::start(ControlPlaneOptions::default().smtp_url(&sink.url())).await;
    let registration = register_user(&cp, "smtp").await;

    let message = sink
        .wait_for_message_to(&registration.email, Duration::from_secs(30))
        .await;
    assert!(
        message
            .header("subject")
            .is_some_and(|s| s.to_lowercase().contains("verify")),
        "subject {:?}",
        message.header("subject")
    );
    assert!(message.header("from").is_some());
    let text = message.text();
    let link = format!("{}/verify-email?token=ipv_", cp.url());
    assert!(text.contains(&link), "no {link}... in the delivered mail:\n{text}");
    let token = instapod_tests::mail::extract_token(&text, "ipv_")
        .unwrap_or_else(|| panic!("no code in the delivered mail:\n{text}"));

    // The outbox row is marked sent.
    let db = cp.db().await;
    let db = &db;
    let email = registration.email.as_str();
    eventually(Duration::from_secs(20), "sent_at to be set", || async move {
        let row = db
            .query_one(
                "SELECT sent_at IS NOT NULL FROM mail_outbox WHERE to_address = $1 AND kind = $2",
                &[&email, &MailKind::VerifyEmail.as_str()],
            )
            .await?;
        ensure!(row.get::<_, bool>(0), "sent_at is still NULL");
        Ok(())
    })
    .await;

    // The delivered code works.
    let verified = cp
        .client()
        .post_json("/api/auth/verify-email", &json!({"token": token}))
        .await
        .json_with_status(200);
    assert_eq!(verified["email_verified"], true);
    assert_eq!(sink.messages().len(), 1, "exactly one message");
}

#[tokio::test]
async fn postgres_down_answers_database_unavailable() {
    let pg = PostgresServer::start();
    let cp = ControlPlane::start(
        ControlPlaneOptions::default()
            .postgres(&pg)
            .env("INSTAPOD_DATABASE_TIMEOUT_SECS", "2"),
    )
    .await;
    let user = register_and_login(&cp).await;
    user.client().get_response("/api/teams").await.assert_status(200);

    // This cluster runs with synchronous_commit=off: flush the login to disk first, or the
    // kill below may lose it and the token would rightly be unknown after the restart.
    pg.connect("postgres")
        .await
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
    pg.stop();

    let client = user.client();
    let client = &client;
    eventually(Duration::from_secs(30), "503 database_unavailable", || async move {
        let response = client.get_response("/api/teams").await;
        if response.status == 503 {
            Ok(response)
        } else {
            Err(anyhow!("answered {}: {}", response.status, response.text()))
        }
    })
    .await
    .assert_error(503, "database_unavailable");
    client
        .get_response("/api/auth/user")
        .await
        .assert_error(503, "database_unavailable");
    cp.client()
        .post_json(
            "/api/auth/login",
            &json!({"email": user.email, "password": user.password}),
        )
        .await
        .assert_error(503, "database_unavailable");
    cp.client()
        .get_response("/api/plans")
        .await
        .assert_error(503, "database_unavailable");

    let ready = cp.client().get_response("/readyz").await;
    let body = ready.json_with_status(503);
    assert_ne!(body["postgres"], "ok", "{body}");
    assert_eq!(body["redis"], "ok", "{body}");
    cp.client().get_response("/healthz").await.assert_status(200);

    // The outage ends: the same token works again without restarting the control plane (the
    // pool and the shared session-lookup connections reconnect).
    pg.restart();
    eventually(Duration::from_secs(30), "the same token works again", || async move {
        let response = client.get_response("/api/auth/user").await;
        if response.status == 200 {
            Ok(())
        } else {
            Err(anyhow!("answered {}: {}", response.status, response.text()))
        }
    })
    .await;
    client.get_response("/api/teams").await.assert_status(200);
    cp.client().get_response("/readyz").await.assert_status(200);
}
