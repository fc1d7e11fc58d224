//! Sessions: one row per issued token (bearer or cookie, the same token), looked up by hash on
//! every authenticated request. Revocation deletes the row, so it takes effect at once on every
//! replica; nothing about a session lives in process memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

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

/// One join of two index lookups for a whole batch of tokens. The active team needs no
/// membership check here because `sessions.active_team_id` never names a team the user has
/// left: switching takes the team's row lock and checks membership, removal takes the same lock
/// and clears the column, and deleting the team nulls it by foreign key.
const LOOKUP_SQL: &str = "SELECT s.token_hash, s.id, s.user_id, COALESCE(s.active_team_id, u.personal_team_id),
        u.email, u.name, u.email_verified_at IS NOT NULL, u.personal_team_id, u.created_at
 FROM sessions s JOIN users u ON u.id = s.user_id
 WHERE s.token_hash = ANY($1) AND s.expires_at > now()";

/// The most tokens looked up by one query.
const MAX_BATCH: usize = 256;

type LookupReply = oneshot::Sender<Result<Option<AuthContext>, DbError>>;

/// Looks sessions up for every authenticated request.
///
/// *Design.* Postgres spends most of a point lookup on executor start-up, not on the index, so
/// concurrent lookups are batched: one task takes every request waiting in its queue (up to
/// [`MAX_BATCH`]), runs one `token_hash = ANY($1)` query, answers each request, and repeats.
/// Nothing is cached: every answer comes from a query that started after the request arrived,
/// so a revoked token is refused at once. At low load a batch is one request and costs one
/// query, as before; under load the batches grow by themselves.
#[derive(Debug, Clone)]
pub struct SessionLookup {
    requests: mpsc::UnboundedSender<(Vec<u8>, LookupReply)>,
}

impl SessionLookup {
    /// Starts the batching task on the current runtime.
    pub fn start(config: &Config) -> Self {
        let query = SharedQuery::new(
            config.database_url.expose().to_string(),
            LOOKUP_SQL,
            config.session_lookup_connections,
            Duration::from_secs(config.database_timeout_secs),
        );
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run_batches(query, receiver));
        SessionLookup { requests }
    }

    /// The caller a token belongs to, if it is a live session.
    pub async fn authenticate(&self, token: &str) -> Result<Option<AuthContext>, DbError> {
        if !tokens::looks_like(TokenKind::Session, token) {
            return Ok(None);
        }
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((tokens::hash(token), reply))
            .map_err(|_| DbError::Unavailable("session lookup stopped".to_string()))?;
        answer
            .await
            .map_err(|_| DbError::Unavailable("session lookup stopped".to_string()))?
    }
}

async fn run_batches(query: SharedQuery, mut receiver: mpsc::UnboundedReceiver<(Vec<u8>, LookupReply)>) {
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let hashes: Vec<&[u8]> = batch.iter().map(|(hash, _)| hash.as_slice()).collect();
        match query.query(&[&hashes]).await {
            Ok(rows) => {
                // Several requests of a batch may carry the same token: answer each with a copy.
                let found: HashMap<Vec<u8>, AuthContext> = rows
                    .iter()
                    .map(|row| (row.get::<_, Vec<u8>>(0), context_from_row(row)))
                    .collect();
                for (hash, reply) in batch {
                    let _gone = reply.send(Ok(found.get(&hash).cloned()));
                }
            }
            Err(err) => {
                let unavailable = err.is_unavailable();
                let message = err.to_string();
                for (_, reply) in batch {
                    let err = if unavailable {
                        DbError::Unavailable(message.clone())
                    } else {
                        DbError::BatchFailed(message.clone())
                    };
                    let _gone = reply.send(Err(err));
                }
            }
        }
    }
}

fn context_from_row(row: &tokio_postgres::Row) -> AuthContext {
    AuthContext {
        session_id: row.get(1),
        user_id: row.get(2),
        team_id: row.get(3),
        source: CredentialSource::Bearer,
        user: UserRow {
            id: row.get(2),
            email: row.get(4),
            name: row.get(5),
            email_verified: row.get(6),
            personal_team_id: row.get(7),
            created_at: row.get(8),
        },
    }
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
