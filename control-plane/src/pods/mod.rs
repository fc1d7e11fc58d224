//! Pods: the state machine ([`state`]), storage with quota, actions, events and reports
//! ([`store`]), input checks ([`validate`]), the scheduler's queue ([`queue`]) and reading logs
//! from the pod's node ([`logs`]), and the metrics history its node pushes ([`metrics`]).

pub mod files;
pub mod logs;
pub mod metrics;
pub mod queue;
pub mod state;
pub mod store;
pub mod validate;
