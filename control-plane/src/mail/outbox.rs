//! Queuing mail, and the texts of the messages the platform sends.

use uuid::Uuid;

use crate::db::DbError;

/// Why a message is sent; stored in `mail_outbox.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailKind {
    VerifyEmail,
    ResetPassword,
}

impl MailKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MailKind::VerifyEmail => "verify_email",
            MailKind::ResetPassword => "reset_password",
        }
    }
}

/// A message ready to queue.
#[derive(Debug, Clone)]
pub struct Mail {
    pub kind: MailKind,
    pub to_address: String,
    pub subject: String,
    pub body_text: String,
}

impl Mail {
    pub fn verify_email(to_address: &str, name: &str, public_url: &str, code: &str) -> Mail {
        Mail {
            kind: MailKind::VerifyEmail,
            to_address: to_address.to_string(),
            subject: "Verify your Instapod email address".to_string(),
            body_text: format!(
                "Hello {name},\n\nconfirm your email address by opening this link within 48 hours:\n\n\
                 {public_url}/verify-email?token={code}\n\n\
                 or send the code with POST /api/auth/verify-email {{\"token\": \"{code}\"}}.\n\n\
                 If you did not create an Instapod account, ignore this message.\n"
            ),
        }
    }

    pub fn reset_password(to_address: &str, name: &str, public_url: &str, code: &str) -> Mail {
        Mail {
            kind: MailKind::ResetPassword,
            to_address: to_address.to_string(),
            subject: "Reset your Instapod password".to_string(),
            body_text: format!(
                "Hello {name},\n\nsomeone asked to reset the password of this Instapod account. \
                 To choose a new password, open this link within one hour:\n\n\
                 {public_url}/reset-password?token={code}\n\n\
                 Resetting signs out every session of the account. \
                 If you did not ask for this, ignore this message: your password is unchanged.\n"
            ),
        }
    }
}

/// Queues `mail` in the caller's transaction.
pub async fn enqueue(client: &impl deadpool_postgres::GenericClient, mail: &Mail) -> Result<Uuid, DbError> {
    let row = client
        .query_one(
            "INSERT INTO mail_outbox (kind, to_address, subject, body_text) VALUES ($1, $2, $3, $4) RETURNING id",
            &[&mail.kind.as_str(), &mail.to_address, &mail.subject, &mail.body_text],
        )
        .await?;
    Ok(row.get(0))
}
