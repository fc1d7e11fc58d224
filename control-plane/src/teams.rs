//! Teams and their members. Every query is scoped by the caller's membership in SQL: a team the
//! caller does not belong to is indistinguishable from one that does not exist (404).
//!
//! Roles: `owner` (everything), `admin` (rename the team, add and remove non-owner members),
//! `member` (read, leave). Only owners grant or change roles and delete the team. A team keeps
//! at least one owner, and a user's personal team can be neither deleted nor left.

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::accounts::validate;
use crate::db::{self, DbError, Pool};

/// A member's role in a team.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, salvo::oapi::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Admin,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
    fn parse(text: &str) -> Role {
        match text {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            _ => Role::Member,
        }
    }
    fn manages_members(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

/// A team as seen by one member.
#[derive(Debug, Clone)]
pub struct TeamRow {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    pub personal: bool,
    pub plan_id: String,
    pub created_at: OffsetDateTime,
    pub role: Role,
    pub member_count: i64,
}

/// A member as listed.
#[derive(Debug, Clone)]
pub struct MemberRow {
    pub user_id: Uuid,
    pub email: String,
    pub name: String,
    pub role: Role,
    pub joined_at: OffsetDateTime,
}

#[derive(Debug, thiserror::Error)]
pub enum TeamError {
    #[error("team {0} not found")]
    NotFound(Uuid),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("slug {0:?} is already taken")]
    SlugTaken(String),
    #[error("no account with email {0}")]
    UserNotFound(String),
    #[error("user {0} is not a member of this team")]
    MemberNotFound(Uuid),
    #[error("{0} is already a member of this team with that role")]
    AlreadyMember(String),
    #[error("a team must keep at least one owner")]
    LastOwner,
    #[error("a personal team cannot be deleted or left")]
    PersonalTeam,
    #[error("team still owns {0} pod(s); delete them first")]
    HasResources(i64),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for TeamError {
    fn from(err: tokio_postgres::Error) -> Self {
        TeamError::Db(err.into())
    }
}

const TEAM_COLUMNS: &str = "t.id, t.name, t.slug, t.personal, t.plan_id, t.created_at, m.role,
    (SELECT count(*) FROM team_members c WHERE c.team_id = t.id)";

fn team_from_row(row: &tokio_postgres::Row) -> TeamRow {
    TeamRow {
        id: row.get(0),
        name: row.get(1),
        slug: row.get(2),
        personal: row.get(3),
        plan_id: row.get(4),
        created_at: row.get(5),
        role: Role::parse(row.get(6)),
        member_count: row.get(7),
    }
}

/// Inserts a team with the given slug; `None` when the slug is taken.
async fn insert_team_with_slug(
    client: &impl GenericClient,
    name: &str,
    slug: &str,
    personal: bool,
) -> Result<Option<TeamRow>, DbError> {
    let row = client
        .query_opt(
            "INSERT INTO teams (name, slug, personal) VALUES ($1, $2, $3)
             ON CONFLICT (slug) DO NOTHING
             RETURNING id, name, slug, personal, plan_id, created_at",
            &[&name, &slug, &personal],
        )
        .await?;
    Ok(row.map(|row| TeamRow {
        id: row.get(0),
        name: row.get(1),
        slug: row.get(2),
        personal: row.get(3),
        plan_id: row.get(4),
        created_at: row.get(5),
        role: Role::Owner,
        member_count: 0,
    }))
}

/// Inserts a team whose slug is derived from its name, with a random suffix when taken.
pub async fn insert_team_auto_slug(
    client: &impl GenericClient,
    name: &str,
    personal: bool,
) -> Result<TeamRow, DbError> {
    let base = validate::slug_from(name);
    if let Some(team) = insert_team_with_slug(client, name, &base, personal).await? {
        return Ok(team);
    }
    loop {
        let suffix: u32 = rand::random::<u32>() % 0x10000;
        let slug = format!("{base}-{suffix:04x}");
        if let Some(team) = insert_team_with_slug(client, name, &slug, personal).await? {
            return Ok(team);
        }
    }
}

/// Creates a team owned by `user_id`.
pub async fn create(pool: &Pool, user_id: Uuid, name: &str, slug: Option<&str>) -> Result<TeamRow, TeamError> {
    let mut client = db::connect(pool).await?;
    let transaction = client.transaction().await?;
    let team = match slug {
        Some(slug) => insert_team_with_slug(&transaction, name, slug, false)
            .await?
            .ok_or_else(|| TeamError::SlugTaken(slug.to_string()))?,
        None => insert_team_auto_slug(&transaction, name, false).await?,
    };
    transaction
        .execute(
            "INSERT INTO team_members (team_id, user_id, role) VALUES ($1, $2, 'owner')",
            &[&team.id, &user_id],
        )
        .await?;
    transaction.commit().await?;
    Ok(TeamRow {
        member_count: 1,
        ..team
    })
}

/// The teams `user_id` belongs to, personal team first.
pub async fn list(pool: &Pool, user_id: Uuid) -> Result<Vec<TeamRow>, TeamError> {
    let client = db::connect(pool).await?;
    let rows = client
        .query(
            &format!(
                "SELECT {TEAM_COLUMNS} FROM teams t JOIN team_members m ON m.team_id = t.id AND m.user_id = $1
                 ORDER BY t.personal DESC, t.created_at, t.id"
            ),
            &[&user_id],
        )
        .await?;
    Ok(rows.iter().map(team_from_row).collect())
}

/// One team, if `user_id` is a member.
pub async fn get(client: &impl GenericClient, user_id: Uuid, team_id: Uuid) -> Result<TeamRow, TeamError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {TEAM_COLUMNS} FROM teams t JOIN team_members m ON m.team_id = t.id AND m.user_id = $1
                 WHERE t.id = $2"
            ),
            &[&user_id, &team_id],
        )
        .await?;
    row.as_ref().map(team_from_row).ok_or(TeamError::NotFound(team_id))
}

pub async fn get_pooled(pool: &Pool, user_id: Uuid, team_id: Uuid) -> Result<TeamRow, TeamError> {
    let client = db::connect(pool).await?;
    get(&client, user_id, team_id).await
}

/// Renames a team or changes its slug (owners and admins).
pub async fn update(
    pool: &Pool,
    user_id: Uuid,
    team_id: Uuid,
    name: Option<&str>,
    slug: Option<&str>,
) -> Result<TeamRow, TeamError> {
    let client = db::connect(pool).await?;
    let team = get(&client, user_id, team_id).await?;
    if !team.role.manages_members() {
        return Err(TeamError::Forbidden("only owners and admins can update a team"));
    }
    let updated = client
        .execute(
            "UPDATE teams SET name = COALESCE($2, name), slug = COALESCE($3, slug) WHERE id = $1",
            &[&team_id, &name, &slug],
        )
        .await;
    match updated {
        Ok(_) => {}
        Err(err) if err.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Err(TeamError::SlugTaken(slug.unwrap_or_default().to_string()));
        }
        Err(err) => return Err(err.into()),
    }
    get(&client, user_id, team_id).await
}

/// Deletes a team (owners only) that owns nothing.
pub async fn delete(pool: &Pool, user_id: Uuid, team_id: Uuid) -> Result<(), TeamError> {
    let mut client = db::connect(pool).await?;
    let transaction = client.transaction().await?;
    // Lock the team row first: a concurrent membership change or pod creation waits for us.
    lock_team(&transaction, team_id).await?;
    let team = get(&transaction, user_id, team_id).await?;
    if team.role != Role::Owner {
        return Err(TeamError::Forbidden("only owners can delete a team"));
    }
    if team.personal {
        return Err(TeamError::PersonalTeam);
    }
    let n_pods: i64 = transaction
        .query_one("SELECT count(*) FROM pods WHERE team_id = $1", &[&team_id])
        .await?
        .get(0);
    if n_pods > 0 {
        return Err(TeamError::HasResources(n_pods));
    }
    match transaction
        .execute("DELETE FROM teams WHERE id = $1", &[&team_id])
        .await
    {
        Ok(_) => {}
        Err(err) if err.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => return Err(TeamError::HasResources(1)),
        Err(err) => return Err(err.into()),
    }
    transaction.commit().await?;
    Ok(())
}

pub async fn members(pool: &Pool, user_id: Uuid, team_id: Uuid) -> Result<Vec<MemberRow>, TeamError> {
    let client = db::connect(pool).await?;
    get(&client, user_id, team_id).await?;
    let rows = client
        .query(
            "SELECT u.id, u.email, u.name, m.role, m.joined_at FROM team_members m JOIN users u ON u.id = m.user_id
             WHERE m.team_id = $1 ORDER BY m.joined_at, u.email",
            &[&team_id],
        )
        .await?;
    Ok(rows.iter().map(member_from_row).collect())
}

fn member_from_row(row: &tokio_postgres::Row) -> MemberRow {
    MemberRow {
        user_id: row.get(0),
        email: row.get(1),
        name: row.get(2),
        role: Role::parse(row.get(3)),
        joined_at: row.get(4),
    }
}

/// Whether [`add_member`] added someone new or changed a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddOutcome {
    Added,
    RoleChanged,
}

/// Adds the user with `email` to the team, or changes an existing member's role (owners only).
pub async fn add_member(
    pool: &Pool,
    caller_id: Uuid,
    team_id: Uuid,
    email: &str,
    role: Role,
) -> Result<(AddOutcome, MemberRow), TeamError> {
    let mut client = db::connect(pool).await?;
    let transaction = client.transaction().await?;
    // Serialise membership changes of one team (the caller's own role included), so role
    // checks and the last-owner rule hold under concurrency.
    lock_team(&transaction, team_id).await?;
    let team = get(&transaction, caller_id, team_id).await?;
    if !team.role.manages_members() {
        return Err(TeamError::Forbidden("only owners and admins can manage members"));
    }
    if role == Role::Owner && team.role != Role::Owner {
        return Err(TeamError::Forbidden("only owners can grant the owner role"));
    }
    let user = transaction
        .query_opt("SELECT id FROM users WHERE email = $1", &[&email])
        .await?
        .ok_or_else(|| TeamError::UserNotFound(email.to_string()))?;
    let target_id: Uuid = user.get(0);
    let existing = transaction
        .query_opt(
            "SELECT role FROM team_members WHERE team_id = $1 AND user_id = $2",
            &[&team_id, &target_id],
        )
        .await?;
    let outcome = match existing {
        None => {
            transaction
                .execute(
                    "INSERT INTO team_members (team_id, user_id, role) VALUES ($1, $2, $3)",
                    &[&team_id, &target_id, &role.as_str()],
                )
                .await?;
            AddOutcome::Added
        }
        Some(row) => {
            let current = Role::parse(row.get(0));
            if current == role {
                return Err(TeamError::AlreadyMember(email.to_string()));
            }
            if team.role != Role::Owner {
                return Err(TeamError::Forbidden("only owners can change roles"));
            }
            if current == Role::Owner && count_owners(&transaction, team_id).await? <= 1 {
                return Err(TeamError::LastOwner);
            }
            transaction
                .execute(
                    "UPDATE team_members SET role = $3 WHERE team_id = $1 AND user_id = $2",
                    &[&team_id, &target_id, &role.as_str()],
                )
                .await?;
            AddOutcome::RoleChanged
        }
    };
    let member = transaction
        .query_one(
            "SELECT u.id, u.email, u.name, m.role, m.joined_at FROM team_members m JOIN users u ON u.id = m.user_id
             WHERE m.team_id = $1 AND m.user_id = $2",
            &[&team_id, &target_id],
        )
        .await?;
    transaction.commit().await?;
    Ok((outcome, member_from_row(&member)))
}

/// Takes the team's row lock for the rest of the transaction (a no-op for unknown ids, which
/// the membership lookup that follows turns into 404).
async fn lock_team(client: &impl GenericClient, team_id: Uuid) -> Result<(), TeamError> {
    client
        .execute("SELECT 1 FROM teams WHERE id = $1 FOR UPDATE", &[&team_id])
        .await?;
    Ok(())
}

async fn count_owners(client: &impl GenericClient, team_id: Uuid) -> Result<i64, TeamError> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM team_members WHERE team_id = $1 AND role = 'owner'",
            &[&team_id],
        )
        .await?
        .get(0))
}

/// Removes a member: owners and admins remove others (admins not owners); anyone leaves.
pub async fn remove_member(pool: &Pool, caller_id: Uuid, team_id: Uuid, target_id: Uuid) -> Result<(), TeamError> {
    let mut client = db::connect(pool).await?;
    let transaction = client.transaction().await?;
    lock_team(&transaction, team_id).await?;
    let team = get(&transaction, caller_id, team_id).await?;
    let target_role = transaction
        .query_opt(
            "SELECT role FROM team_members WHERE team_id = $1 AND user_id = $2",
            &[&team_id, &target_id],
        )
        .await?
        .map(|row| Role::parse(row.get(0)))
        .ok_or(TeamError::MemberNotFound(target_id))?;
    if target_id != caller_id {
        if !team.role.manages_members() {
            return Err(TeamError::Forbidden("only owners and admins can remove other members"));
        }
        if target_role == Role::Owner && team.role != Role::Owner {
            return Err(TeamError::Forbidden("only owners can remove an owner"));
        }
    }
    let is_personal_owner: bool = transaction
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM users WHERE id = $1 AND personal_team_id = $2)",
            &[&target_id, &team_id],
        )
        .await?
        .get(0);
    if is_personal_owner {
        return Err(TeamError::PersonalTeam);
    }
    if target_role == Role::Owner && count_owners(&transaction, team_id).await? <= 1 {
        return Err(TeamError::LastOwner);
    }
    transaction
        .execute(
            "DELETE FROM team_members WHERE team_id = $1 AND user_id = $2",
            &[&team_id, &target_id],
        )
        .await?;
    // Sessions that had this team active fall back to the personal team (see `sessions`).
    transaction
        .execute(
            "UPDATE sessions SET active_team_id = NULL WHERE user_id = $1 AND active_team_id = $2",
            &[&target_id, &team_id],
        )
        .await?;
    transaction.commit().await?;
    Ok(())
}

/// Makes `team_id` the active team of a session, if the user is a member. Holds the team's row
/// lock (shared) so a concurrent removal of the member either happens first (then 404) or waits
/// and clears the choice again.
pub async fn switch_active(pool: &Pool, user_id: Uuid, session_id: Uuid, team_id: Uuid) -> Result<TeamRow, TeamError> {
    let mut client = db::connect(pool).await?;
    let transaction = client.transaction().await?;
    transaction
        .execute("SELECT 1 FROM teams WHERE id = $1 FOR SHARE", &[&team_id])
        .await?;
    let team = get(&transaction, user_id, team_id).await?;
    transaction
        .execute(
            "UPDATE sessions SET active_team_id = $2 WHERE id = $1",
            &[&session_id, &team_id],
        )
        .await?;
    transaction.commit().await?;
    Ok(team)
}
