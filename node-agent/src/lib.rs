//! The node agent: joins the fleet, drives containerd over gRPC, and runs the pods the control
//! plane assigns to its node.
//!
//! Code map: [`config`] · [`agent`] (assembly and loops) · [`fleet`] (join, heartbeat, reports)
//! · [`jobs`] (the apalis consumer) · [`pods`] (jobs → containerd state, restart policy,
//! reconcile) · [`spec`] (OCI runtime spec) · [`network`] (CNI bridge, netns, isolation) ·
//! [`image`] (references, registry, tarballs, the image store) · [`runtime`] (the only module
//! that talks to containerd) · [`dirs`] (state directory layout) · [`logs`] (rotation) ·
//! [`capacity`] · [`metrics`] · [`ingress`] (the HTTP reverse proxy to pods) · [`ssh`] (the SSH
//! gateway into pods) · [`domains`] (custom domains: DNS checks, ACME orders, TLS by SNI).

pub mod agent;
pub mod capacity;
pub mod cli;
pub mod config;
pub mod dirs;
pub mod domains;
pub mod files;
pub mod fleet;
pub mod image;
pub mod ingress;
pub mod jobs;
pub mod log_driver;
pub mod log_reader;
pub mod logs;
pub mod metrics;
pub mod network;
pub mod pods;
pub mod runtime;
pub mod sampler;
pub mod spec;
pub mod ssh;
pub mod transfer;

/// An error's message followed by those of its sources, `: `-separated, skipping a source whose
/// text its parent already quotes: transport errors say little at the top ("transport error")
/// and the useful part ("No such file or directory") further down.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}
