//! The mail delivery worker: a named background loop that claims due messages with
//! `FOR UPDATE SKIP LOCKED` (so several control-plane replicas never send one message twice),
//! sends them over SMTP with lettre, and records the outcome. Failures are retried with
//! exponential backoff up to `mail.max_attempts`. Without SMTP configured, each message is
//! written to the log (with its link, so the local stack is usable) and marked delivered.
//! Delivered messages keep their headers but lose their body, so codes do not linger.

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::sync::watch;
use uuid::Uuid;

use crate::config::MailConfig;
use crate::db::{self, DbError, Pool};

/// How messages leave the building.
enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Log,
}

pub struct MailWorker {
    pool: Pool,
    config: MailConfig,
    transport: Transport,
    from: Mailbox,
}

impl std::fmt::Debug for MailWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailWorker")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
enum DeliverError {
    #[error("building message: {0}")]
    Build(String),
    #[error("smtp: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
}

impl MailWorker {
    pub fn new(pool: Pool, config: MailConfig) -> anyhow::Result<Self> {
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|err| anyhow::anyhow!("mail.from {:?} is not a mailbox: {err}", config.from))?;
        let url = config.smtp_url.expose();
        let transport = if url.is_empty() {
            Transport::Log
        } else {
            let url = url
                .strip_prefix("smtp+starttls://")
                .map_or_else(|| url.to_string(), |rest| format!("smtp://{rest}?tls=required"));
            Transport::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(&url)
                    .map_err(|err| anyhow::anyhow!("mail.smtp_url is invalid: {err}"))?
                    .timeout(Some(Duration::from_secs(20)))
                    .build(),
            )
        };
        Ok(MailWorker {
            pool,
            config,
            transport,
            from,
        })
    }

    /// Runs until `shutdown` flips to true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let interval = Duration::from_millis(self.config.poll_interval_ms.max(50));
        tracing::info!(
            worker = "mail",
            smtp = matches!(self.transport, Transport::Smtp(_)),
            "worker started"
        );
        loop {
            match self.deliver_due().await {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(err) => tracing::warn!(worker = "mail", error = %err, "delivery round failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => break,
            }
        }
        tracing::info!(worker = "mail", "worker stopped");
    }

    /// Claims and delivers up to 10 due messages; returns how many it handled.
    async fn deliver_due(&self) -> Result<usize, DbError> {
        let mut client = db::connect(&self.pool).await?;
        let transaction = client.transaction().await?;
        let rows = transaction
            .query(
                "SELECT id, kind, to_address, subject, body_text, attempts FROM mail_outbox
                 WHERE sent_at IS NULL AND next_attempt_at <= now() AND attempts < $1
                 ORDER BY next_attempt_at LIMIT 10 FOR UPDATE SKIP LOCKED",
                &[&self.config.max_attempts],
            )
            .await?;
        for row in &rows {
            let id: Uuid = row.get(0);
            let kind: String = row.get(1);
            let to: String = row.get(2);
            let subject: String = row.get(3);
            let body: String = row.get::<_, Option<String>>(4).unwrap_or_default();
            let attempts: i32 = row.get(5);
            match self.deliver(&kind, &to, &subject, &body).await {
                Ok(()) => {
                    transaction
                        .execute(
                            "UPDATE mail_outbox SET sent_at = now(), body_text = NULL, attempts = attempts + 1, last_error = NULL WHERE id = $1",
                            &[&id],
                        )
                        .await?;
                }
                Err(err) => {
                    let backoff_secs = 2f64.powi(attempts.min(12)) * 5.0;
                    tracing::warn!(worker = "mail", mail_id = %id, attempt = attempts + 1, error = %err, "mail delivery failed");
                    transaction
                        .execute(
                            "UPDATE mail_outbox SET attempts = attempts + 1, last_error = $2,
                                    next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1",
                            &[&id, &err.to_string(), &backoff_secs],
                        )
                        .await?;
                }
            }
        }
        transaction.commit().await?;
        Ok(rows.len())
    }

    async fn deliver(&self, kind: &str, to: &str, subject: &str, body: &str) -> Result<(), DeliverError> {
        match &self.transport {
            Transport::Log => {
                tracing::info!(
                    worker = "mail",
                    kind,
                    to,
                    subject,
                    body,
                    "mail (SMTP not configured, logged instead)"
                );
                Ok(())
            }
            Transport::Smtp(smtp) => {
                let to: Mailbox = to
                    .parse()
                    .map_err(|err| DeliverError::Build(format!("recipient {to:?}: {err}")))?;
                let message = Message::builder()
                    .from(self.from.clone())
                    .to(to)
                    .subject(subject)
                    .body(body.to_string())
                    .map_err(|err| DeliverError::Build(err.to_string()))?;
                smtp.send(message).await?;
                Ok(())
            }
        }
    }
}
