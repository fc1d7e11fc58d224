//! The seven authentication endpoints: register, login, logout, current user, forgot and reset
//! password, verify email.

use std::net::{IpAddr, Ipv4Addr};

use salvo::http::cookie::{Cookie, SameSite};
use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::accounts::{sessions, users, validate};
use crate::api::responses::{Accepted, Created, NoContent};
use crate::api::teams::TeamView;
use crate::error::ApiError;
use crate::http::auth::{SESSION_COOKIE, caller};
use crate::http::client_ip::client_ip;
use crate::http::json;
use crate::http::state::{AppState, app};
use crate::ratelimit::{self, Rule};

/// An account.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub email_verified: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The active team of the credential in use (the personal team outside a request).
    pub active_team_id: Uuid,
}

impl UserView {
    pub fn new(user: users::UserRow, active_team_id: Option<Uuid>) -> Self {
        UserView {
            id: user.id,
            active_team_id: active_team_id.unwrap_or(user.personal_team_id),
            email: user.email,
            name: user.name,
            email_verified: user.email_verified,
            created_at: user.created_at,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Trimmed and lowercased before use.
    pub email: String,
    /// 8 to 1024 characters.
    pub password: String,
    /// 1 to 100 characters.
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegisterResponse {
    pub user: UserView,
    /// The personal team created with the account.
    pub team: TeamView,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoginResponse {
    /// Send as `Authorization: Bearer <token>`; the same token is set as the session cookie.
    pub token: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub user: UserView,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgotPasswordRequest {
    pub email: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPasswordRequest {
    /// The `ipr_…` code from the reset mail.
    pub token: String,
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyEmailRequest {
    /// The `ipv_…` code from the verification mail.
    pub token: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageResponse {
    pub message: String,
}

pub(crate) async fn limit(req: &Request, state: &AppState, rule: Rule) -> Result<(), ApiError> {
    let ip = client_ip(req, &state.config.trusted_proxies).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    state.rate_limiter.check(rule, ip).await?;
    Ok(())
}

fn session_cookie(value: String, secure: bool, expires: Option<OffsetDateTime>) -> Cookie<'static> {
    let mut cookie = Cookie::build((SESSION_COOKIE, value))
        .http_only(true)
        .same_site(SameSite::Lax)
        .path("/")
        .secure(secure)
        .build();
    match expires {
        Some(at) => cookie.set_expires(at),
        None => cookie.make_removal(),
    }
    cookie
}

/// Create an account
///
/// Creates the user and a personal team, and mails a verification code. Does not log in.
#[endpoint(tags("auth"), request_body = RegisterRequest)]
pub async fn register(req: &mut Request, depot: &mut Depot) -> Result<Created<RegisterResponse>, ApiError> {
    let state = app(depot).clone();
    limit(req, &state, ratelimit::REGISTER).await?;
    let body: RegisterRequest = json::read(req).await?;
    let email = validate::email(&body.email).map_err(ApiError::validation)?;
    validate::password(&body.password).map_err(ApiError::validation)?;
    let name = validate::display_name("name", &body.name).map_err(ApiError::validation)?;
    let registered = users::register(&state.db, &email, body.password, &name, &state.config.public_url).await?;
    let team = TeamView::new(registered.team, Some(registered.user.personal_team_id));
    Ok(Created(RegisterResponse {
        user: UserView::new(registered.user, None),
        team,
    }))
}

/// Log in
///
/// Returns a fresh bearer token and sets the same token as the `instapod_session` cookie.
#[endpoint(tags("auth"), request_body = LoginRequest)]
pub async fn login(req: &mut Request, depot: &mut Depot, res: &mut Response) -> Result<Json<LoginResponse>, ApiError> {
    let state = app(depot).clone();
    limit(req, &state, ratelimit::LOGIN).await?;
    let body: LoginRequest = json::read(req).await?;
    // A malformed email cannot belong to an account: the same answer as a wrong password.
    let email = validate::email(&body.email).unwrap_or_default();
    let ip = client_ip(req, &state.config.trusted_proxies);
    let (session, user) = users::login(&state.db, &email, body.password, state.config.session_ttl_hours, ip).await?;
    res.add_cookie(session_cookie(
        session.token.clone(),
        state.config.served_over_https(),
        Some(session.expires_at),
    ));
    Ok(Json(LoginResponse {
        token: session.token,
        expires_at: session.expires_at,
        user: UserView::new(user, None),
    }))
}

/// Log out
///
/// Revokes the token in use (whether sent as bearer or cookie) and clears the cookie.
#[endpoint(tags("auth"))]
pub async fn logout(depot: &mut Depot, res: &mut Response) -> Result<NoContent, ApiError> {
    let state = app(depot).clone();
    sessions::revoke(&state.db, caller(depot).session_id).await?;
    res.add_cookie(session_cookie(String::new(), state.config.served_over_https(), None));
    Ok(NoContent)
}

/// Get the current user
#[endpoint(tags("auth"))]
pub async fn current_user(depot: &mut Depot) -> Result<Json<UserView>, ApiError> {
    // The session lookup already read the account: no second query.
    let me = caller(depot);
    Ok(Json(UserView::new(me.user.clone(), Some(me.team_id))))
}

/// Request a password reset
///
/// Answers the same whether or not the email belongs to an account; when it does, a reset code
/// valid for one hour is mailed.
#[endpoint(tags("auth"), request_body = ForgotPasswordRequest)]
pub async fn forgot_password(req: &mut Request, depot: &mut Depot) -> Result<Accepted<MessageResponse>, ApiError> {
    let state = app(depot).clone();
    limit(req, &state, ratelimit::FORGOT_PASSWORD).await?;
    let body: ForgotPasswordRequest = json::read(req).await?;
    let email = validate::email(&body.email).map_err(ApiError::validation)?;
    users::request_password_reset(&state.db, &email, &state.config.public_url).await?;
    Ok(Accepted(MessageResponse {
        message: "if an account exists for this email, a reset link has been sent to it".to_string(),
    }))
}

/// Reset the password with a mailed code
///
/// Sets the new password and signs out every session and token of the account.
#[endpoint(tags("auth"), request_body = ResetPasswordRequest)]
pub async fn reset_password(req: &mut Request, depot: &mut Depot) -> Result<Json<MessageResponse>, ApiError> {
    let state = app(depot).clone();
    let body: ResetPasswordRequest = json::read(req).await?;
    validate::password(&body.password).map_err(ApiError::validation)?;
    users::reset_password(&state.db, body.token.trim(), body.password).await?;
    Ok(Json(MessageResponse {
        message: "password changed; every session was signed out".to_string(),
    }))
}

/// Verify the email address with a mailed code
#[endpoint(tags("auth"), request_body = VerifyEmailRequest)]
pub async fn verify_email(req: &mut Request, depot: &mut Depot) -> Result<Json<UserView>, ApiError> {
    let state = app(depot).clone();
    let body: VerifyEmailRequest = json::read(req).await?;
    let user = users::verify_email(&state.db, body.token.trim()).await?;
    Ok(Json(UserView::new(user, None)))
}
