//! The node agent: joins the fleet, drives containerd over gRPC, and runs the ingress, the SSH
//! gateway and the files/logs API for the pods on its node.
//!
//! Nothing is implemented yet; the runtime arrives with the node-agent issue. This crate exists
//! now so the workspace has its final shape; it exports nothing.
