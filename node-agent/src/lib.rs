//! The node agent: joins the fleet, drives containerd over gRPC, and runs the pods the control
//! plane assigns to its node.
//!
//! Code map: [`config`] · [`agent`] (assembly and loops) · [`fleet`] (join, heartbeat, reports)
//! · [`jobs`] (the apalis consumer) · [`pods`] (jobs → containerd state, restart policy,
//! reconcile) · [`spec`] (OCI runtime spec) · [`network`] (CNI bridge, netns, isolation) ·
//! [`image`] (references, registry, tarballs, the image store) · [`runtime`] (the only module
//! that talks to containerd) · [`dirs`] (state directory layout) · [`logs`] (rotation) ·
//! [`capacity`] · [`metrics`].

pub mod agent;
pub mod capacity;
pub mod cli;
pub mod config;
pub mod dirs;
pub mod fleet;
pub mod image;
pub mod jobs;
pub mod logs;
pub mod metrics;
pub mod network;
pub mod pods;
pub mod runtime;
pub mod spec;
