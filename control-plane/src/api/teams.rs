//! The nine team endpoints. Every `{id}` is looked up through the caller's membership, so
//! another team's id answers 404.

use salvo::oapi::ToSchema;
use salvo::oapi::extract::PathParam;
use salvo::prelude::*;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::accounts::validate;
use crate::api::responses::{Created, NoContent, OkOrCreated};
use crate::error::ApiError;
use crate::http::auth::caller;
use crate::http::json;
use crate::http::state::app;
use crate::teams::{self, AddOutcome, MemberRow, Role, TeamRow};

/// A team, as seen by the caller.
#[derive(Debug, Serialize, ToSchema)]
pub struct TeamView {
    pub id: Uuid,
    pub name: String,
    /// DNS label used in pod hostnames; unique across the platform.
    pub slug: String,
    /// The team created with the account; it cannot be deleted or left.
    pub personal: bool,
    pub plan: String,
    /// The caller's role in the team.
    pub role: Role,
    pub member_count: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Whether this is the active team of the credential in use.
    pub active: bool,
}

impl TeamView {
    pub fn new(team: TeamRow, active_team_id: Option<Uuid>) -> Self {
        TeamView {
            active: active_team_id == Some(team.id),
            id: team.id,
            name: team.name,
            slug: team.slug,
            personal: team.personal,
            plan: team.plan_id,
            role: team.role,
            member_count: team.member_count,
            created_at: team.created_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TeamList {
    pub teams: Vec<TeamView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MemberView {
    pub user_id: Uuid,
    pub email: String,
    pub name: String,
    pub role: Role,
    #[serde(with = "time::serde::rfc3339")]
    pub joined_at: OffsetDateTime,
}

impl From<MemberRow> for MemberView {
    fn from(member: MemberRow) -> Self {
        MemberView {
            user_id: member.user_id,
            email: member.email,
            name: member.name,
            role: member.role,
            joined_at: member.joined_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MemberList {
    pub members: Vec<MemberView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTeamRequest {
    /// 1 to 100 characters.
    pub name: String,
    /// Optional; derived from the name when absent.
    pub slug: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTeamRequest {
    pub name: Option<String>,
    pub slug: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchTeamRequest {
    pub team_id: Uuid,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    /// Email of an existing account.
    pub email: String,
    /// Defaults to `member`. For an existing member, changes the role (owners only).
    pub role: Option<Role>,
}

/// List your teams
#[endpoint(tags("teams"))]
pub async fn list(depot: &mut Depot) -> Result<Json<TeamList>, ApiError> {
    let state = app(depot);
    let me = caller(depot);
    let rows = teams::list(&state.db, me.user_id).await?;
    Ok(Json(TeamList {
        teams: rows.into_iter().map(|t| TeamView::new(t, Some(me.team_id))).collect(),
    }))
}

/// Create a team
#[endpoint(tags("teams"), request_body = CreateTeamRequest)]
pub async fn create(req: &mut Request, depot: &mut Depot) -> Result<Created<TeamView>, ApiError> {
    let state = app(depot).clone();
    let me = caller(depot).clone();
    let body: CreateTeamRequest = json::read(req).await?;
    let name = validate::display_name("name", &body.name).map_err(ApiError::validation)?;
    let slug = body
        .slug
        .as_deref()
        .map(validate::slug)
        .transpose()
        .map_err(ApiError::validation)?;
    let team = teams::create(&state.db, me.user_id, &name, slug.as_deref()).await?;
    Ok(Created(TeamView::new(team, Some(me.team_id))))
}

/// Switch the active team
///
/// Sets the active team of the session or token in use.
#[endpoint(tags("teams"), request_body = SwitchTeamRequest)]
pub async fn switch(req: &mut Request, depot: &mut Depot) -> Result<Json<TeamView>, ApiError> {
    let state = app(depot).clone();
    let me = caller(depot).clone();
    let body: SwitchTeamRequest = json::read(req).await?;
    let team = teams::switch_active(&state.db, me.user_id, me.session_id, body.team_id).await?;
    Ok(Json(TeamView::new(team, Some(body.team_id))))
}

/// Get a team
#[endpoint(tags("teams"))]
pub async fn get(id: PathParam<Uuid>, depot: &mut Depot) -> Result<Json<TeamView>, ApiError> {
    let state = app(depot);
    let me = caller(depot);
    let team = teams::get_pooled(&state.db, me.user_id, *id).await?;
    Ok(Json(TeamView::new(team, Some(me.team_id))))
}

/// Update a team (owners and admins)
#[endpoint(tags("teams"), request_body = UpdateTeamRequest)]
pub async fn update(id: PathParam<Uuid>, req: &mut Request, depot: &mut Depot) -> Result<Json<TeamView>, ApiError> {
    let state = app(depot).clone();
    let me = caller(depot).clone();
    let body: UpdateTeamRequest = json::read(req).await?;
    let name = body
        .name
        .as_deref()
        .map(|name| validate::display_name("name", name))
        .transpose()
        .map_err(ApiError::validation)?;
    let slug = body
        .slug
        .as_deref()
        .map(validate::slug)
        .transpose()
        .map_err(ApiError::validation)?;
    let team = teams::update(&state.db, me.user_id, *id, name.as_deref(), slug.as_deref()).await?;
    Ok(Json(TeamView::new(team, Some(me.team_id))))
}

/// Delete a team (owners only)
///
/// Refused with 409 while the team owns pods, and for personal teams.
#[endpoint(tags("teams"))]
pub async fn delete(id: PathParam<Uuid>, depot: &mut Depot) -> Result<NoContent, ApiError> {
    let state = app(depot);
    teams::delete(&state.db, caller(depot).user_id, *id).await?;
    Ok(NoContent)
}

/// List team members
#[endpoint(tags("teams"))]
pub async fn members(id: PathParam<Uuid>, depot: &mut Depot) -> Result<Json<MemberList>, ApiError> {
    let state = app(depot);
    let rows = teams::members(&state.db, caller(depot).user_id, *id).await?;
    Ok(Json(MemberList {
        members: rows.into_iter().map(MemberView::from).collect(),
    }))
}

/// Add a team member, or change a member's role
///
/// Adds an existing account by email (201). Naming an existing member with another role changes
/// the role (200, owners only). There is no invitation flow yet.
#[endpoint(tags("teams"), request_body = AddMemberRequest)]
pub async fn add_member(
    id: PathParam<Uuid>,
    req: &mut Request,
    depot: &mut Depot,
) -> Result<OkOrCreated<MemberView>, ApiError> {
    let state = app(depot).clone();
    let me = caller(depot).clone();
    let body: AddMemberRequest = json::read(req).await?;
    let email = validate::email(&body.email).map_err(ApiError::validation)?;
    let role = body.role.unwrap_or(Role::Member);
    let (outcome, member) = teams::add_member(&state.db, me.user_id, *id, &email, role).await?;
    Ok(OkOrCreated {
        created: outcome == AddOutcome::Added,
        body: member.into(),
    })
}

/// Remove a team member, or leave the team
#[endpoint(tags("teams"))]
pub async fn remove_member(
    id: PathParam<Uuid>,
    uid: PathParam<Uuid>,
    depot: &mut Depot,
) -> Result<NoContent, ApiError> {
    let state = app(depot);
    teams::remove_member(&state.db, caller(depot).user_id, *id, *uid).await?;
    Ok(NoContent)
}
