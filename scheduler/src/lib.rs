//! The scheduler: placement of pods on nodes, and the reconciler.
//!
//! Nothing is implemented yet. The placement algorithm (a pure function from a snapshot of the
//! fleet and a request to a node or an "unschedulable because …"), the placement worker that
//! reserves capacity in one Postgres transaction, and the reconciler arrive with the pods issue.
//! This crate exists now so the workspace has its final shape; it exports nothing.
