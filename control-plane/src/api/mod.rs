//! The API's handlers, one file per area of the spec (and `internal` for node agents). Each
//! handler parses, authorises, calls one domain operation and maps its result; request and
//! response types live beside it.

pub mod auth;
pub mod catalog;
pub mod domains;
pub mod files;
pub mod internal;
pub mod internal_domains;
pub mod logs;
pub mod metrics;
pub mod pages;
pub mod platform;
pub mod pods;
pub mod responses;
pub mod ssh;
pub mod teams;
