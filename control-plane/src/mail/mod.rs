//! Outgoing mail: messages are queued in the `mail_outbox` table inside the transaction that
//! causes them (so a rolled-back registration sends nothing) and delivered by
//! [`worker::MailWorker`].

pub mod outbox;
pub mod worker;
