//! Pod placement: which node takes a pod, as a pure function of a snapshot of the fleet; and,
//! in [`worker`], the scheduler process that calls it.
//!
//! *Design.* The caller (the placement worker) reads the fleet from Postgres into
//! [`NodeView`]s — health, region, labels, allocatable and what is already reserved — and asks
//! [`place()`] for a node for one [`PlacementRequest`] under a [`Strategy`]. The answer is a
//! [`Placement`] or an [`Unschedulable`] whose `Display` says why in words a user can act on.
//! The placement code (every module but `worker`) never touches Postgres, Redis or the clock:
//! committing the reservation without over-committing a node when several schedulers race is
//! the worker's job, and the worker's locking, not the placement code, guarantees capacity.
//!
//! *Invariants.* Placement does no I/O, uses no randomness and keeps no global state: the same
//! inputs give the same answer, in any order of the nodes (ties go to the smallest node id).
//! The chosen node is healthy, passes every constraint of the request, has the requested
//! resources free, and no other such node ranks strictly higher.
//!
//! *Two entry points, one answer.* [`place()`] scans a slice of views: simple, and fast enough
//! for a worker that reads the fleet per placement (a few thousand placements a second at
//! 10,000 nodes, far more than one Postgres read of the fleet per placement allows).
//! [`FleetIndex`] holds a compact copy of one snapshot, skips whole blocks of nodes that cannot
//! fit or cannot win, and mirrors the reservations the caller commits; it is for callers that
//! place many pods against one snapshot (over 100,000 placements a second at 10,000 nodes).
//! Both return identical results for the same nodes, which the tests check on random fleets,
//! and both agree with a slow oracle.

mod index;
mod node;
mod place;
mod request;
mod strategy;
#[cfg(test)]
mod testkit;
mod unschedulable;
pub mod worker;

pub use index::{FleetIndex, UnknownNode};
pub use node::NodeView;
pub use place::{Placement, place};
pub use request::PlacementRequest;
pub use strategy::Strategy;
pub use unschedulable::Unschedulable;
