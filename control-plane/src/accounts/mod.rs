//! Accounts: users, passwords, sessions and the one-time codes mailed for verification and
//! password reset. The HTTP handlers in `api::auth` are thin wrappers around these operations.

pub mod password;
pub mod sessions;
pub mod tokens;
pub mod users;
pub mod validate;
