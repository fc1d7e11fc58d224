//! Account operations: register, log in, verify the email address, and reset a forgotten
//! password. Inputs arrive validated (see `validate`); each operation is one transaction.

use std::net::IpAddr;

use time::OffsetDateTime;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::accounts::password::{self, PasswordError};
use crate::accounts::sessions::{self, IssuedSession};
use crate::accounts::tokens::{self, TokenKind};
use crate::db::{self, DbError, Pool};
use crate::mail::outbox::{self, Mail};
use crate::teams::{self, TeamRow};

/// A user as stored.
#[derive(Debug, Clone)]
pub struct UserRow {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub email_verified: bool,
    pub personal_team_id: Uuid,
    pub created_at: OffsetDateTime,
}

const USER_COLUMNS: &str = "id, email, name, email_verified_at IS NOT NULL, personal_team_id, created_at";

fn user_from_row(row: &tokio_postgres::Row) -> UserRow {
    UserRow {
        id: row.get(0),
        email: row.get(1),
        name: row.get(2),
        email_verified: row.get(3),
        personal_team_id: row.get(4),
        created_at: row.get(5),
    }
}

const VERIFY_CODE_TTL: time::Duration = time::Duration::hours(48);
const RESET_CODE_TTL: time::Duration = time::Duration::hours(1);

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("an account with email {0} already exists")]
    EmailTaken(String),
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error(transparent)]
    Db(#[from] DbError),
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("invalid email or password")]
    InvalidCredentials,
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A reset or verification code that is unknown, used or expired.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error("the code is invalid, already used or expired")]
    Invalid,
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for RegisterError {
    fn from(err: tokio_postgres::Error) -> Self {
        RegisterError::Db(err.into())
    }
}
impl From<tokio_postgres::Error> for LoginError {
    fn from(err: tokio_postgres::Error) -> Self {
        LoginError::Db(err.into())
    }
}
impl From<tokio_postgres::Error> for CodeError {
    fn from(err: tokio_postgres::Error) -> Self {
        CodeError::Db(err.into())
    }
}
impl From<deadpool_postgres::PoolError> for CodeError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        CodeError::Db(err.into())
    }
}

/// What registration created.
#[derive(Debug)]
pub struct Registered {
    pub user: UserRow,
    pub team: TeamRow,
}

/// Creates the user, their personal team (owner) and a verification mail, in one transaction.
pub async fn register(
    pool: &Pool,
    email: &str,
    password_plain: String,
    name: &str,
    public_url: &str,
) -> Result<Registered, RegisterError> {
    let password_hash = password::hash(password_plain).await?;
    let mut client = db::connect(pool).await?;
    let transaction = client.transaction().await?;
    let team = teams::insert_team_auto_slug(&transaction, name, true).await?;
    let inserted = transaction
        .query_one(
            &format!(
                "INSERT INTO users (email, name, password_hash, personal_team_id) VALUES ($1, $2, $3, $4)
                 RETURNING {USER_COLUMNS}"
            ),
            &[&email, &name, &password_hash, &team.id],
        )
        .await;
    let user = match inserted {
        Ok(row) => user_from_row(&row),
        Err(err) if err.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Err(RegisterError::EmailTaken(email.to_string()));
        }
        Err(err) => return Err(err.into()),
    };
    transaction
        .execute(
            "INSERT INTO team_members (team_id, user_id, role) VALUES ($1, $2, 'owner')",
            &[&team.id, &user.id],
        )
        .await?;
    let code = issue_code(&transaction, user.id, TokenKind::VerifyEmail).await?;
    outbox::enqueue(
        &transaction,
        &Mail::verify_email(&user.email, &user.name, public_url, &code),
    )
    .await?;
    transaction.commit().await?;
    let team = TeamRow {
        member_count: 1,
        ..team
    };
    Ok(Registered { user, team })
}

async fn issue_code(
    client: &impl deadpool_postgres::GenericClient,
    user_id: Uuid,
    kind: TokenKind,
) -> Result<String, DbError> {
    let (purpose, ttl) = match kind {
        TokenKind::VerifyEmail => ("verify_email", VERIFY_CODE_TTL),
        TokenKind::ResetPassword => ("reset_password", RESET_CODE_TTL),
        TokenKind::Session | TokenKind::Node => {
            unreachable!("sessions are issued by sessions::create, node tokens by nodes::store::join")
        }
    };
    let code = tokens::generate(kind);
    client
        .execute(
            "INSERT INTO one_time_codes (code_hash, user_id, purpose, expires_at) VALUES ($1, $2, $3, $4)",
            &[&code.hash, &user_id, &purpose, &(OffsetDateTime::now_utc() + ttl)],
        )
        .await?;
    Ok(code.plain)
}

/// Checks the password and issues a fresh session. Unknown emails cost the same hashing work
/// as known ones and answer the same error.
pub async fn login(
    pool: &Pool,
    email: &str,
    password_plain: String,
    ttl_hours: u32,
    client_ip: Option<IpAddr>,
) -> Result<(IssuedSession, UserRow), LoginError> {
    let client = db::connect(pool).await?;
    let row = client
        .query_opt(
            &format!("SELECT {USER_COLUMNS}, password_hash FROM users WHERE email = $1"),
            &[&email],
        )
        .await?;
    let (user, stored_hash) = match &row {
        Some(row) => (Some(user_from_row(row)), row.get::<_, String>(6)),
        None => (None, password::DUMMY_HASH.to_string()),
    };
    let matches = password::verify(password_plain, stored_hash).await?;
    let Some(user) = user.filter(|_| matches) else {
        return Err(LoginError::InvalidCredentials);
    };
    let session = sessions::create(&client, user.id, ttl_hours, client_ip).await?;
    Ok((session, user))
}

pub async fn get(pool: &Pool, user_id: Uuid) -> Result<Option<UserRow>, DbError> {
    let client = db::connect(pool).await?;
    let statement = client
        .prepare_cached(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
        .await?;
    Ok(client
        .query_opt(&statement, &[&user_id])
        .await?
        .map(|row| user_from_row(&row)))
}

/// Consumes a live code of `purpose` in the transaction; returns its user.
async fn consume_code(
    transaction: &tokio_postgres::Transaction<'_>,
    plain: &str,
    kind: TokenKind,
    purpose: &str,
) -> Result<Uuid, CodeError> {
    if !tokens::looks_like(kind, plain) {
        return Err(CodeError::Invalid);
    }
    let row = transaction
        .query_opt(
            "UPDATE one_time_codes SET used_at = now()
             WHERE code_hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > now()
             RETURNING user_id",
            &[&tokens::hash(plain), &purpose],
        )
        .await?;
    row.map(|row| row.get(0)).ok_or(CodeError::Invalid)
}

/// Marks the email verified.
pub async fn verify_email(pool: &Pool, code: &str) -> Result<UserRow, CodeError> {
    let mut client = db::connect(pool).await?;
    let transaction = client.transaction().await?;
    let user_id = consume_code(&transaction, code, TokenKind::VerifyEmail, "verify_email").await?;
    let row = transaction
        .query_one(
            &format!(
                "UPDATE users SET email_verified_at = COALESCE(email_verified_at, now()) WHERE id = $1
                 RETURNING {USER_COLUMNS}"
            ),
            &[&user_id],
        )
        .await?;
    transaction.commit().await?;
    Ok(user_from_row(&row))
}

/// Queues a reset mail when the email belongs to an account; does nothing otherwise. The caller
/// answers the same either way.
pub async fn request_password_reset(pool: &Pool, email: &str, public_url: &str) -> Result<(), DbError> {
    let mut client = db::connect(pool).await?;
    let transaction = client.transaction().await?;
    let row = transaction
        .query_opt(&format!("SELECT {USER_COLUMNS} FROM users WHERE email = $1"), &[&email])
        .await?;
    if let Some(row) = row {
        let user = user_from_row(&row);
        let code = issue_code(&transaction, user.id, TokenKind::ResetPassword).await?;
        outbox::enqueue(
            &transaction,
            &Mail::reset_password(&user.email, &user.name, public_url, &code),
        )
        .await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// Sets a new password, consumes the code (and every other reset code of the user), and ends
/// every session of the user.
pub async fn reset_password(pool: &Pool, code: &str, new_password: String) -> Result<(), CodeError> {
    // Hash first: a slow hash must not hold the row locks taken below.
    let password_hash = password::hash(new_password).await?;
    let mut client = db::connect(pool).await?;
    let transaction = client.transaction().await?;
    let user_id = consume_code(&transaction, code, TokenKind::ResetPassword, "reset_password").await?;
    transaction
        .execute(
            "UPDATE users SET password_hash = $2 WHERE id = $1",
            &[&user_id, &password_hash],
        )
        .await?;
    transaction
        .execute(
            "UPDATE one_time_codes SET used_at = now() WHERE user_id = $1 AND purpose = 'reset_password' AND used_at IS NULL",
            &[&user_id],
        )
        .await?;
    sessions::revoke_all(&transaction, user_id).await?;
    transaction.commit().await?;
    Ok(())
}

/// Creates a verified user with a personal team if the email is new, then issues a session:
/// the local stack's ready-to-use account. Returns the user and a fresh token.
pub async fn bootstrap(
    pool: &Pool,
    email: &str,
    password_plain: String,
    name: &str,
    ttl_hours: u32,
) -> Result<(UserRow, IssuedSession), RegisterError> {
    let existing = {
        let client = db::connect(pool).await?;
        client
            .query_opt("SELECT id FROM users WHERE email = $1", &[&email])
            .await?
    };
    let user_id = match existing {
        Some(row) => row.get(0),
        None => match register(pool, email, password_plain, name, "").await {
            Ok(registered) => registered.user.id,
            Err(RegisterError::EmailTaken(_)) => {
                let client = db::connect(pool).await?;
                client
                    .query_one("SELECT id FROM users WHERE email = $1", &[&email])
                    .await?
                    .get(0)
            }
            Err(err) => return Err(err),
        },
    };
    let client = db::connect(pool).await?;
    client
        .execute(
            "UPDATE users SET email_verified_at = COALESCE(email_verified_at, now()) WHERE id = $1",
            &[&user_id],
        )
        .await?;
    // The verification mail of a bootstrap account is moot.
    client
        .execute(
            "DELETE FROM mail_outbox WHERE to_address = $1 AND kind = 'verify_email' AND sent_at IS NULL",
            &[&email],
        )
        .await?;
    let session = sessions::create(&client, user_id, ttl_hours, None).await?;
    let user = get(pool, user_id)
        .await?
        .ok_or_else(|| DbError::Unavailable("bootstrap user vanished".into()))?;
    Ok((user, session))
}
