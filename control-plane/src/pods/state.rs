//! The pod state machine, in one place: which user action is allowed in which state, what it
//! changes, and how a node's report maps onto a pod's state.
//!
//! States: `pending → scheduled → starting → running → stopping → stopped`, `failed`,
//! `deleting → deleted` (the row goes), and `unknown` (its node stopped heartbeating). The
//! desired state is `running`, `stopped` or `deleted`; every accepted action bumps the pod's
//! generation so older jobs and reports are ignored.

use serde::Serialize;

/// A user's request on a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Restart,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Restart => "restart",
            Action::Delete => "delete",
        }
    }
}

/// What to do with an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Accept: move to `state` with `desired`, bump the generation, enqueue.
    Apply {
        state: &'static str,
        desired: &'static str,
        restart: bool,
    },
    /// The same operation is already in flight: answer 202 again, change nothing.
    InFlight,
    /// Refused (409) with a message naming the current state.
    Conflict(String),
}

/// The pod as the state machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Current<'a> {
    pub state: &'a str,
    pub desired: &'a str,
    pub has_node: bool,
    pub restart_requested: bool,
}

/// Decides `action` on a pod in `current`.
pub fn decide(current: Current<'_>, action: Action) -> Decision {
    let state = current.state;
    if state == "deleting" || current.desired == "deleted" {
        return match action {
            Action::Delete => Decision::InFlight,
            _ => Decision::Conflict(format!("the pod is being deleted (state {state})")),
        };
    }
    match action {
        Action::Delete => Decision::Apply {
            state: "deleting",
            desired: "deleted",
            restart: false,
        },
        Action::Start => match (current.desired, state) {
            ("running", "running") => Decision::Conflict("the pod is already running".into()),
            ("running", "pending" | "scheduled" | "starting" | "unknown") => Decision::InFlight,
            (_, "stopping") => Decision::Conflict("the pod is stopping; start it once it has stopped".into()),
            _ => Decision::Apply {
                state: if current.has_node { "starting" } else { "pending" },
                desired: "running",
                restart: false,
            },
        },
        Action::Stop => match (current.desired, state) {
            ("stopped", "stopped" | "failed") => Decision::Conflict(format!("the pod is already {state}")),
            ("stopped", _) => Decision::InFlight,
            (_, "failed") => Decision::Conflict("the pod has failed and is not running".into()),
            _ => Decision::Apply {
                state: if current.has_node { "stopping" } else { "stopped" },
                desired: "stopped",
                restart: false,
            },
        },
        Action::Restart => match (current.desired, state) {
            ("running", "running" | "failed") if current.has_node => Decision::Apply {
                state: "starting",
                desired: "running",
                restart: true,
            },
            ("running", "starting") if current.restart_requested => Decision::InFlight,
            ("running", _) => Decision::Conflict(format!("the pod is {state}; restart it once it is running")),
            _ => Decision::Conflict(format!("the pod is {state}; start it instead")),
        },
    }
}

/// The pod state a node's report means, given what the pod should be doing; `None` when the
/// pod is gone from the node (delete the row).
pub fn from_report(node_state: &str, desired: &str) -> Option<&'static str> {
    Some(match node_state {
        "starting" => "starting",
        "running" => "running",
        "stopped" => "stopped",
        // An exit under a restart policy comes back by itself; otherwise the pod stopped.
        "exited" if desired == "running" => "starting",
        "exited" => "stopped",
        "failed" => "failed",
        "deleted" => return None,
        _ => "unknown",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(state: &str, desired: &str) -> Current<'static> {
        let state: &'static str = Box::leak(state.to_string().into_boxed_str());
        let desired: &'static str = Box::leak(desired.to_string().into_boxed_str());
        Current {
            state,
            desired,
            has_node: true,
            restart_requested: false,
        }
    }

    #[test]
    fn actions_follow_the_state_machine() {
        assert!(matches!(
            decide(pod("running", "running"), Action::Start),
            Decision::Conflict(_)
        ));
        assert_eq!(decide(pod("starting", "running"), Action::Start), Decision::InFlight);
        assert!(matches!(
            decide(pod("stopped", "stopped"), Action::Start),
            Decision::Apply { state: "starting", .. }
        ));
        assert!(matches!(
            decide(pod("running", "running"), Action::Stop),
            Decision::Apply { state: "stopping", .. }
        ));
        assert_eq!(decide(pod("stopping", "stopped"), Action::Stop), Decision::InFlight);
        assert!(matches!(
            decide(pod("stopped", "stopped"), Action::Stop),
            Decision::Conflict(_)
        ));
        assert!(matches!(
            decide(pod("stopped", "stopped"), Action::Restart),
            Decision::Conflict(_)
        ));
        assert!(matches!(
            decide(pod("running", "running"), Action::Restart),
            Decision::Apply { restart: true, .. }
        ));
        let mut restarting = pod("starting", "running");
        restarting.restart_requested = true;
        assert_eq!(decide(restarting, Action::Restart), Decision::InFlight);
        assert!(matches!(
            decide(pod("running", "running"), Action::Delete),
            Decision::Apply { state: "deleting", .. }
        ));
        assert_eq!(decide(pod("deleting", "deleted"), Action::Delete), Decision::InFlight);
        assert!(matches!(
            decide(pod("deleting", "deleted"), Action::Start),
            Decision::Conflict(_)
        ));
        let mut unplaced = pod("stopped", "stopped");
        unplaced.has_node = false;
        assert!(matches!(
            decide(unplaced, Action::Start),
            Decision::Apply { state: "pending", .. }
        ));
    }

    #[test]
    fn reports_map_onto_pod_states() {
        assert_eq!(from_report("running", "running"), Some("running"));
        assert_eq!(from_report("exited", "running"), Some("starting"));
        assert_eq!(from_report("exited", "stopped"), Some("stopped"));
        assert_eq!(from_report("failed", "running"), Some("failed"));
        assert_eq!(from_report("deleted", "deleted"), None);
    }
}
