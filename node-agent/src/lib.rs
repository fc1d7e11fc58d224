//! The node agent: joins the fleet, drives containerd over gRPC, and runs the ingress, the SSH
//! gateway and the files/logs API for the pods on its node.
//!
//! Implemented so far: [`runtime`], the connection to containerd (namespace-scoped requests,
//! the Version service, errors mapped to [`runtime::RuntimeError`]). Images, pods, networking,
//! volumes, fleet membership and the job consumer arrive with the rest of the node-agent issue.

pub mod runtime;
