//! Sessions: one row per issued token (bearer or cookie, the same token), looked up by hash on
//! every authenticated request. Revocation deletes the row, so it takes effect at once on every
//! replica; nothing about a session lives in process memory.

use std::net::IpAddr;
use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::accounts::tokens::{self, TokenKind};
use crate::accounts::users::UserRow;
use crate::config::Config;
use crate::db::{self, DbError, Pool};
use crate::http::auth::CredentialSource;
use crate::shared_client::SharedQuery;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct AuthContext {
    pub session_id: Uuid,
    pub user_id: Uuid,
    /// The active team: the one chosen with `/api/teams/switch` while the caller is still a
    /// member of it, else the personal team.
    pub team_id: Uuid,
    pub source: CredentialSource,
    /// The caller's account, read in the same query as the session.
    pub user: UserRow,
}

/// A new session's token, shown once.
#[derive(Debug)]
pub struct IssuedSession {
    pub token: String,
    pub expires_at: OffsetDateTime,
}

/// Issues a fresh token for `user_id` (login always does; a token is never reused).
pub async fn create(
    client: &impl deadpool_postgres::GenericClient,
    user_id: Uuid,
    ttl_hours: u32,
    client_ip: Option<IpAddr>,
) -> Result<IssuedSession, DbError> {
    let token = tokens::generate(TokenKind::Session);
    let expires_at = OffsetDateTime::now_utc() + time::Duration::hours(i64::from(ttl_hours));
    client
        .execute(
            "INSERT INTO sessions (user_id, token_hash, expires_at, client_ip) VALUES ($1, $2, $3, $4)",
            &[&user_id, &token.hash, &expires_at, &client_ip.map(|ip| ip.to_string())],
        )
        .await?;
    Ok(IssuedSession {
        token: token.plain,
        expires_at,
    })
}

/// One join of two index lookups: the cheapest plan Postgres can run on every request. The
/// active team needs no membership check here because `sessions.active_team_id` never names a
/// team the user has left: switching takes the team's row lock and checks membership, removal
/// takes the same lock and clears the column, and deleting the team nulls it by foreign key.
const LOOKUP_SQL: &str = "SELECT s.id, s.user_id, COALESCE(s.active_team_id, u.personal_team_id),
        u.email, u.name, u.email_verified_at IS NOT NULL, u.personal_team_id, u.created_at
 FROM sessions s JOIN users u ON u.id = s.user_id
 WHERE s.token_hash = $1 AND s.expires_at > now()";

/// The shared, pipelined query [`authenticate`] runs.
pub fn lookup_query(config: &Config) -> SharedQuery {
    SharedQuery::new(
        config.database_url.expose().to_string(),
        LOOKUP_SQL,
        config.session_lookup_connections,
        Duration::from_secs(config.database_timeout_secs),
    )
}

/// The caller a token belongs to, if it is a live session.
pub async fn authenticate(lookup: &SharedQuery, token: &str) -> Result<Option<AuthContext>, DbError> {
    if !tokens::looks_like(TokenKind::Session, token) {
        return Ok(None);
    }
    let row = lookup.query_opt(&[&tokens::hash(token)]).await?;
    Ok(row.map(|row| AuthContext {
        session_id: row.get(0),
        user_id: row.get(1),
        team_id: row.get(2),
        source: CredentialSource::Bearer,
        user: UserRow {
            id: row.get(1),
            email: row.get(3),
            name: row.get(4),
            email_verified: row.get(5),
            personal_team_id: row.get(6),
            created_at: row.get(7),
        },
    }))
}

/// Ends one session (logout).
pub async fn revoke(pool: &Pool, session_id: Uuid) -> Result<(), DbError> {
    let client = db::connect(pool).await?;
    client
        .execute("DELETE FROM sessions WHERE id = $1", &[&session_id])
        .await?;
    Ok(())
}

/// Ends every session of a user (password reset).
pub async fn revoke_all(client: &impl deadpool_postgres::GenericClient, user_id: Uuid) -> Result<u64, DbError> {
    Ok(client
        .execute("DELETE FROM sessions WHERE user_id = $1", &[&user_id])
        .await?)
}
