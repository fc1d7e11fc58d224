//! SSH into pods, the control plane's half: the keys registered on each pod (`keys`: what a
//! key line must be; `store`: the `pod_ssh_keys` rows, the connection info and the gateway's
//! per-attempt authorization). The gateway itself runs in every node agent (`node-agent/src/ssh/`).
//!
//! *Usernames.* A pod's SSH username is the first label of its platform hostname
//! (`<pod name>-<team slug>`). That label can be ambiguous (pod `a-b` of team `c` and pod `a`
//! of team `b-c` both give `a-b-c`), so the pod id is accepted as a username too; the
//! connection info names the pod id instead whenever another live pod shares the label, and
//! the gateway refuses a label that opens more than one pod with the presented key.

pub mod keys;
pub mod store;
