//! Creating users through the public API: register, optionally verify the email with the code
//! from the outbox, and log in.
//!
//! Registration is limited to 3 per minute per client IP and login to 5, so every call here
//! comes from a fresh random `X-Forwarded-For` address (see [`crate::client`]).

use serde_json::{Value, json};

use crate::client::Client;
use crate::control_plane::ControlPlane;
use crate::ids;
use crate::mail::MailKind;

/// A registered (and, for [`TestUser`], logged-in) account.
#[derive(Debug, Clone)]
pub struct Registration {
    pub email: String,
    pub password: String,
    pub name: String,
    pub user_id: String,
    pub personal_team_id: String,
    /// The whole 201 body, `{"user": ..., "team": ...}`.
    pub body: Value,
}

/// A logged-in user with a bearer token.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub email: String,
    pub password: String,
    pub name: String,
    pub token: String,
    pub user_id: String,
    pub personal_team_id: String,
    base_url: String,
}

impl TestUser {
    /// A client authenticated with this user's bearer token (and its own random client IP).
    pub fn client(&self) -> Client {
        Client::new(&self.base_url).with_token(&self.token)
    }

    /// Waits up to `wait` until `GET /api/pods/{name}` shows `state`; its last body.
    pub async fn wait_pod_state(&self, name: &str, state: &str, wait: std::time::Duration) -> Value {
        crate::eventually(wait, &format!("pod {name} {state}"), || async {
            let body = self.client().get(&format!("/api/pods/{name}")).send().await.json();
            anyhow::ensure!(body["state"] == state, "{body}");
            Ok(body)
        })
        .await
    }
}

/// Registers a new user whose email starts with `label`; asserts 201 and returns what the
/// control plane answered.
pub async fn register_user(control_plane: &ControlPlane, label: &str) -> Registration {
    let email = ids::unique_email(label);
    let password = ids::password_of_len(16);
    let name = format!("{label} tester");
    let body = control_plane
        .client()
        .post_json(
            "/api/auth/register",
            &json!({"email": email, "password": password, "name": name}),
        )
        .await
        .json_with_status(201);
    let user_id = string_field(&body, "/user/id");
    let personal_team_id = string_field(&body, "/team/id");
    Registration {
        email,
        password,
        name,
        user_id,
        personal_team_id,
        body,
    }
}

/// Logs in (from a fresh client IP) and returns the token; asserts 200.
pub async fn login(control_plane: &ControlPlane, email: &str, password: &str) -> String {
    let body = control_plane
        .client()
        .post_json("/api/auth/login", &json!({"email": email, "password": password}))
        .await
        .json_with_status(200);
    string_field(&body, "/token")
}

/// Verifies the user's email with the code from the outbox; asserts 200.
pub async fn verify_email(control_plane: &ControlPlane, email: &str) -> Value {
    let token = control_plane.latest_token(email, MailKind::VerifyEmail).await;
    control_plane
        .client()
        .post_json("/api/auth/verify-email", &json!({"token": token}))
        .await
        .json_with_status(200)
}

/// Registers and logs in a new user (email not verified).
pub async fn register_and_login(control_plane: &ControlPlane) -> TestUser {
    register_and_login_as(control_plane, "user", false).await
}

/// Registers and logs in a new user whose personal team is on the `scale` plan (room for many
/// pods).
pub async fn scale_user(control_plane: &ControlPlane) -> TestUser {
    let user = register_and_login(control_plane).await;
    control_plane
        .db()
        .await
        .execute(
            "UPDATE teams SET plan_id = 'scale' WHERE id = $1::text::uuid",
            &[&user.personal_team_id],
        )
        .await
        .expect("upgrade the plan");
    user
}

/// Registers a new user whose email starts with `label`, verifies the email when asked, and
/// logs in.
pub async fn register_and_login_as(control_plane: &ControlPlane, label: &str, verify: bool) -> TestUser {
    let registration = register_user(control_plane, label).await;
    if verify {
        verify_email(control_plane, &registration.email).await;
    }
    let token = login(control_plane, &registration.email, &registration.password).await;
    TestUser {
        email: registration.email,
        password: registration.password,
        name: registration.name,
        token,
        user_id: registration.user_id,
        personal_team_id: registration.personal_team_id,
        base_url: control_plane.url().to_string(),
    }
}

/// The string at JSON pointer `pointer`; panics with the body when missing.
pub fn string_field(body: &Value, pointer: &str) -> String {
    body.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {body}"))
        .to_string()
}
