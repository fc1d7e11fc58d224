//! Containers, tasks and the task event stream.
//!
//! *Design.* A pod is one container whose id is the pod id and whose labels name the pod and
//! its generation, so the agent can find everything it owns by listing its namespace. The OCI
//! runtime spec travels as JSON inside a protobuf `Any` (containerd's typeurl for runtime-spec
//! types). The task's stdout and stderr go to a `binary://` URI: the runc shim starts the agent
//! binary as its log driver (`log_driver.rs`), which appends timestamped lines to the pod's log
//! file and, as the shim's child, survives agent restarts. Deleting what does not exist is not
//! an error (every operation here may be retried).

use std::collections::HashMap;

use containerd_client::events::{TaskExit, TaskOom};
use containerd_client::services::v1::container::Runtime as ContainerRuntime;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest, DeleteTaskRequest,
    GetContainerRequest, GetRequest, KillRequest, ListContainersRequest, StartRequest, SubscribeRequest,
    UpdateContainerRequest, UpdateTaskRequest,
};
use containerd_client::types::Mount;
use containerd_client::types::v1::Status as ProcessStatus;
use futures_util::{Stream, StreamExt};
use prost::Message;
use prost_types::Any;

use super::{Runtime, RuntimeError, SNAPSHOTTER};

/// The runtime shim pods run under.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// How long [`Runtime::create_task`] waits for an earlier create of the same task to end.
const BUNDLE_IN_USE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);
/// How often it looks meanwhile.
const BUNDLE_IN_USE_POLL: std::time::Duration = std::time::Duration::from_millis(250);

const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
const RESOURCES_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

/// A container the agent finds in its namespace.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    pub id: String,
    pub labels: HashMap<String, String>,
    pub snapshot_key: String,
}

/// What a container is created with.
#[derive(Debug, Clone)]
pub struct NewContainer {
    pub id: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    /// The OCI runtime spec, as JSON.
    pub spec_json: Vec<u8>,
    pub snapshot_key: String,
}

/// The state of a container's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Created,
    Running,
    /// Exited with this status; not yet deleted.
    Stopped {
        exit_status: u32,
    },
    Paused,
    Unknown,
}

/// What the event stream says about tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    /// A task's init process exited (exec'd processes are filtered out).
    Exit { container_id: String, exit_status: u32 },
    /// The kernel's OOM killer killed a process in the container.
    Oom { container_id: String },
}

impl Runtime {
    /// Creates a container; `AlreadyExists` when one with this id exists.
    pub async fn create_container(&self, new: NewContainer) -> Result<(), RuntimeError> {
        let container = Container {
            id: new.id,
            labels: new.labels,
            image: new.image,
            runtime: Some(ContainerRuntime {
                name: RUNC_RUNTIME.to_string(),
                options: None,
            }),
            spec: Some(Any {
                type_url: SPEC_TYPE_URL.to_string(),
                value: new.spec_json,
            }),
            snapshotter: SNAPSHOTTER.to_string(),
            snapshot_key: new.snapshot_key,
            created_at: None,
            updated_at: None,
            extensions: HashMap::new(),
            sandbox: String::new(),
        };
        ContainersClient::new(self.channel())
            .create(self.request(CreateContainerRequest {
                container: Some(container),
            }))
            .await
            .map_err(|status| RuntimeError::from_status("Containers.Create", &status))?;
        Ok(())
    }

    /// The container `id`, with its spec JSON, if it exists.
    pub async fn container(&self, id: &str) -> Result<Option<(ContainerInfo, Vec<u8>)>, RuntimeError> {
        match ContainersClient::new(self.channel())
            .get(self.request(GetContainerRequest { id: id.to_string() }))
            .await
        {
            Ok(response) => Ok(response.into_inner().container.map(|c| {
                let spec = c.spec.as_ref().map(|any| any.value.clone()).unwrap_or_default();
                (
                    ContainerInfo {
                        id: c.id,
                        labels: c.labels,
                        snapshot_key: c.snapshot_key,
                    },
                    spec,
                )
            })),
            Err(status) => match RuntimeError::from_status("Containers.Get", &status) {
                RuntimeError::NotFound { .. } => Ok(None),
                err => Err(err),
            },
        }
    }

    /// Every container in the namespace.
    pub async fn containers(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let response = ContainersClient::new(self.channel())
            .list(self.request(ListContainersRequest { filters: Vec::new() }))
            .await
            .map_err(|status| RuntimeError::from_status("Containers.List", &status))?
            .into_inner();
        Ok(response
            .containers
            .into_iter()
            .map(|c| ContainerInfo {
                id: c.id,
                labels: c.labels,
                snapshot_key: c.snapshot_key,
            })
            .collect())
    }

    /// Replaces the spec and labels of container `id` (used by resize so a restart keeps the
    /// new limits).
    pub async fn update_container(
        &self,
        id: &str,
        spec_json: Vec<u8>,
        labels: HashMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let container = Container {
            id: id.to_string(),
            labels,
            spec: Some(Any {
                type_url: SPEC_TYPE_URL.to_string(),
                value: spec_json,
            }),
            ..Default::default()
        };
        ContainersClient::new(self.channel())
            .update(self.request(UpdateContainerRequest {
                container: Some(container),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["spec".to_string(), "labels".to_string()],
                }),
            }))
            .await
            .map_err(|status| RuntimeError::from_status("Containers.Update", &status))?;
        Ok(())
    }

    /// Deletes the container record (not its snapshot); a missing one is fine.
    pub async fn delete_container(&self, id: &str) -> Result<(), RuntimeError> {
        match ContainersClient::new(self.channel())
            .delete(self.request(DeleteContainerRequest { id: id.to_string() }))
            .await
        {
            Ok(_) => Ok(()),
            Err(status) => match RuntimeError::from_status("Containers.Delete", &status) {
                RuntimeError::NotFound { .. } => Ok(()),
                err => Err(err),
            },
        }
    }

    /// Creates the task of container `id` on `rootfs`, its stdout and stderr sent to `log_uri`
    /// (see [`crate::log_driver::log_uri`]).
    ///
    /// An earlier create of the same task may still be running in containerd (the agent was
    /// killed during it and has restarted): its bundle directory exists, and a new create fails
    /// with "mkdir <bundle>: file exists" without there being a task yet. That create either
    /// finishes (the task appears, and is the one this call wanted) or fails and removes its
    /// bundle; so for up to [`BUNDLE_IN_USE_WAIT`] this waits for either, then gives up with
    /// containerd's error.
    pub async fn create_task(&self, id: &str, rootfs: Vec<Mount>, log_uri: &str) -> Result<(), RuntimeError> {
        let deadline = tokio::time::Instant::now() + BUNDLE_IN_USE_WAIT;
        loop {
            match self.create_task_once(id, rootfs.clone(), log_uri).await {
                Err(RuntimeError::Rpc { message, .. })
                    if message.contains("file exists") && tokio::time::Instant::now() < deadline =>
                {
                    tracing::info!(container = id, error = %message, "an earlier create of this task is still in containerd; waiting for it");
                    tokio::time::sleep(BUNDLE_IN_USE_POLL).await;
                    if self.task_state(id).await?.is_some() {
                        return Ok(());
                    }
                }
                other => return other,
            }
        }
    }

    async fn create_task_once(&self, id: &str, rootfs: Vec<Mount>, log_uri: &str) -> Result<(), RuntimeError> {
        let uri = log_uri.to_string();
        TasksClient::new(self.channel())
            .create(self.request(CreateTaskRequest {
                container_id: id.to_string(),
                rootfs,
                stdin: String::new(),
                stdout: uri.clone(),
                stderr: uri,
                terminal: false,
                checkpoint: None,
                options: None,
                runtime_path: String::new(),
            }))
            .await
            .map_err(|status| RuntimeError::from_status("Tasks.Create", &status))?;
        Ok(())
    }

    /// Starts a created task.
    pub async fn start_task(&self, id: &str) -> Result<u32, RuntimeError> {
        let response = TasksClient::new(self.channel())
            .start(self.request(StartRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
            .map_err(|status| RuntimeError::from_status("Tasks.Start", &status))?;
        Ok(response.into_inner().pid)
    }

    /// The state of container `id`'s task, `None` when it has none.
    pub async fn task_state(&self, id: &str) -> Result<Option<TaskState>, RuntimeError> {
        match TasksClient::new(self.channel())
            .get(self.request(GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(response) => Ok(response.into_inner().process.map(|process| {
                match ProcessStatus::try_from(process.status).unwrap_or(ProcessStatus::Unknown) {
                    ProcessStatus::Created => TaskState::Created,
                    ProcessStatus::Running => TaskState::Running,
                    ProcessStatus::Stopped => TaskState::Stopped {
                        exit_status: process.exit_status,
                    },
                    ProcessStatus::Paused | ProcessStatus::Pausing => TaskState::Paused,
                    ProcessStatus::Unknown => TaskState::Unknown,
                }
            })),
            Err(status) => match RuntimeError::from_status("Tasks.Get", &status) {
                RuntimeError::NotFound { .. } => Ok(None),
                err => Err(err),
            },
        }
    }

    /// Sends `signal` to every process of the task; a missing task is fine.
    pub async fn kill_task(&self, id: &str, signal: u32) -> Result<(), RuntimeError> {
        match TasksClient::new(self.channel())
            .kill(self.request(KillRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                signal,
                all: true,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(status) => match RuntimeError::from_status("Tasks.Kill", &status) {
                RuntimeError::NotFound { .. } => Ok(()),
                // "process already finished"
                RuntimeError::Rpc {
                    code: containerd_client::tonic::Code::FailedPrecondition,
                    ..
                } => Ok(()),
                err => Err(err),
            },
        }
    }

    /// Deletes a stopped task and returns its exit status; `None` when there was no task.
    pub async fn delete_task(&self, id: &str) -> Result<Option<u32>, RuntimeError> {
        match TasksClient::new(self.channel())
            .delete(self.request(DeleteTaskRequest {
                container_id: id.to_string(),
            }))
            .await
        {
            Ok(response) => Ok(Some(response.into_inner().exit_status)),
            Err(status) => match RuntimeError::from_status("Tasks.Delete", &status) {
                RuntimeError::NotFound { .. } => Ok(None),
                err => Err(err),
            },
        }
    }

    /// Applies new resource limits (OCI `LinuxResources` as JSON) to a running task.
    pub async fn update_task_resources(&self, id: &str, resources_json: Vec<u8>) -> Result<(), RuntimeError> {
        TasksClient::new(self.channel())
            .update(self.request(UpdateTaskRequest {
                container_id: id.to_string(),
                resources: Some(Any {
                    type_url: RESOURCES_TYPE_URL.to_string(),
                    value: resources_json,
                }),
                annotations: HashMap::new(),
            }))
            .await
            .map_err(|status| RuntimeError::from_status("Tasks.Update", &status))?;
        Ok(())
    }

    /// Task exits and OOM kills in this namespace, as they happen. The stream ends when the
    /// connection to containerd does; callers resubscribe (and reconcile what they missed).
    pub async fn task_events(
        &self,
    ) -> Result<impl Stream<Item = Result<TaskEvent, RuntimeError>> + Send + Unpin + 'static, RuntimeError> {
        let ns = self.namespace().to_string();
        let filters = vec![
            format!("namespace=={ns},topic==\"/tasks/exit\""),
            format!("namespace=={ns},topic==\"/tasks/oom\""),
        ];
        let stream = EventsClient::new(self.channel())
            .subscribe(self.request(SubscribeRequest { filters }))
            .await
            .map_err(|status| RuntimeError::from_status("Events.Subscribe", &status))?
            .into_inner();
        Ok(Box::pin(stream.filter_map(|item| async move {
            match item {
                Err(status) => Some(Err(RuntimeError::from_status("Events.Subscribe", &status))),
                Ok(envelope) => {
                    let event = envelope.event?;
                    if envelope.topic == "/tasks/exit" {
                        let exit = TaskExit::decode(event.value.as_slice()).ok()?;
                        // Exits of exec'd processes carry their exec id; the init process's id
                        // is the container id.
                        (exit.id.is_empty() || exit.id == exit.container_id).then_some(Ok(TaskEvent::Exit {
                            container_id: exit.container_id,
                            exit_status: exit.exit_status,
                        }))
                    } else if envelope.topic == "/tasks/oom" {
                        let oom = TaskOom::decode(event.value.as_slice()).ok()?;
                        Some(Ok(TaskEvent::Oom {
                            container_id: oom.container_id,
                        }))
                    } else {
                        None
                    }
                }
            }
        })))
    }
}
