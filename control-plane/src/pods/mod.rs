//! Pods: the state machine ([`state`]), storage with quota, actions, events and reports
//! ([`store`]), input checks ([`validate`]) and the scheduler's queue ([`queue`]).

pub mod queue;
pub mod state;
pub mod store;
pub mod validate;
