//! Reading the mail a control plane queued: the `mail_outbox` table, polled because mail is
//! written by the request but may be picked up asynchronously.
//!
//! Codes appear in the body inside a URL, `<public_url>/verify-email?token=ipv_...` or
//! `<public_url>/reset-password?token=ipr_...`; [`extract_token`] finds them.

use std::time::Duration;

use anyhow::{Context, anyhow};

use crate::control_plane::ControlPlane;
use crate::eventually::eventually;

/// How long queued mail may take to appear.
const MAIL_TIMEOUT: Duration = Duration::from_secs(20);

/// The kinds of mail the foundation sends (the `kind` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailKind {
    VerifyEmail,
    ResetPassword,
}

impl MailKind {
    /// The value of the `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            MailKind::VerifyEmail => "verify_email",
            MailKind::ResetPassword => "reset_password",
        }
    }

    /// The prefix of the code this mail carries.
    pub fn token_prefix(self) -> &'static str {
        match self {
            MailKind::VerifyEmail => "ipv_",
            MailKind::ResetPassword => "ipr_",
        }
    }

    /// The path of the page the mail links to.
    pub fn link_path(self) -> &'static str {
        match self {
            MailKind::VerifyEmail => "/verify-email",
            MailKind::ResetPassword => "/reset-password",
        }
    }
}

/// The first `token=<prefix>...` value in `body` (the token runs until a character outside the
/// base64url alphabet).
pub fn extract_token(body: &str, prefix: &str) -> Option<String> {
    let marker = format!("token={prefix}");
    let start = body.find(&marker)? + "token=".len();
    let token: String = body[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    (token.len() > prefix.len()).then_some(token)
}

impl ControlPlane {
    /// How many outbox rows exist for `to` of `kind`.
    pub async fn mail_count(&self, to: &str, kind: MailKind) -> i64 {
        let db = self.db().await;
        let row = db
            .query_one(
                "SELECT count(*) FROM mail_outbox WHERE to_address = $1 AND kind = $2",
                &[&to, &kind.as_str()],
            )
            .await
            .unwrap_or_else(|err| panic!("cannot count mail_outbox rows: {err}"));
        row.get(0)
    }

    /// The body of the newest outbox mail to `to` of `kind`, waiting until it exists.
    pub async fn latest_mail(&self, to: &str, kind: MailKind) -> String {
        self.latest_mail_after(to, kind, 0).await
    }

    /// Like [`Self::latest_mail`], but waits until more than `seen` such mails exist, so a test
    /// can ask for the mail a request it just made queued.
    pub async fn latest_mail_after(&self, to: &str, kind: MailKind, seen: i64) -> String {
        let db = self.db().await;
        let db = &db;
        let what = format!("a {} mail to {to}", kind.as_str());
        eventually(MAIL_TIMEOUT, &what, || async move {
            let rows = db
                .query(
                    "SELECT body_text FROM mail_outbox WHERE to_address = $1 AND kind = $2 \
                     ORDER BY created_at DESC, id DESC",
                    &[&to, &kind.as_str()],
                )
                .await
                .context("querying mail_outbox")?;
            if (rows.len() as i64) <= seen {
                return Err(anyhow!("{} such mail(s) so far", rows.len()));
            }
            let body: Option<String> = rows[0].get(0);
            body.ok_or_else(|| anyhow!("the newest one has no body_text (already delivered?)"))
        })
        .await
    }

    /// The code in the newest outbox mail to `to` of `kind`, checking that it sits in a link to
    /// this control plane's public URL.
    pub async fn latest_token(&self, to: &str, kind: MailKind) -> String {
        let body = self.latest_mail(to, kind).await;
        self.token_in(&body, kind)
    }

    /// The code in the mail of `kind` to `to` that arrives after `seen` earlier ones.
    pub async fn next_token(&self, to: &str, kind: MailKind, seen: i64) -> String {
        let body = self.latest_mail_after(to, kind, seen).await;
        self.token_in(&body, kind)
    }

    fn token_in(&self, body: &str, kind: MailKind) -> String {
        let link = format!("{}{}?token={}", self.url(), kind.link_path(), kind.token_prefix());
        assert!(
            body.contains(&link),
            "the {} mail does not link to {link}...; body:\n{body}",
            kind.as_str()
        );
        extract_token(body, kind.token_prefix())
            .unwrap_or_else(|| panic!("no {} token in mail body:\n{body}", kind.token_prefix()))
    }
}

#[cfg(test)]
mod tests {
    use super::extract_token;

    #[test]
    fn extracts_tokens_from_links() {
        let body = "Hello,\n\nhttp://127.0.0.1:1/verify-email?token=ipv_abc-DEF_123\n\nBye";
        assert_eq!(extract_token(body, "ipv_").as_deref(), Some("ipv_abc-DEF_123"));
        assert_eq!(extract_token(body, "ipr_"), None);
        assert_eq!(extract_token("token=ipv_", "ipv_"), None);
        assert_eq!(
            extract_token("x?token=ipr_zz&next=1", "ipr_").as_deref(),
            Some("ipr_zz")
        );
    }
}
