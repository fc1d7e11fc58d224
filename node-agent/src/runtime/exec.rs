//! Running an extra process inside a pod's running container (containerd's `Tasks.Exec`), for
//! the SSH gateway: the process spec is the container's own (user, environment, capabilities,
//! working directory, no-new-privileges, AppArmor/seccomp) with other arguments, optionally a
//! terminal; its stdio are FIFOs this module creates in a private directory.
//!
//! *Design.* containerd hands the FIFO paths to the runc shim, which opens them itself (and
//! keeps a write end of stdin, closed by `CloseIO`). Before the exec the agent opens each FIFO
//! read-write so neither side blocks on open; once the shim has started the process, the output
//! FIFOs are reopened read-only and the read-write handles dropped, so a read returns end of file
//! exactly when the shim closed its side (all output delivered). stdin stays open read-write on
//! our side: dropping it and calling [`Runtime::close_exec_stdin`] is the end of input.
//!
//! *Limitations.* The exec'd process lives in the container's namespaces and cgroup, so it ends
//! with the container (a stopped pod ends its sessions). A process spec the container's spec
//! cannot give (no `process` object) is refused.

use std::path::{Path, PathBuf};

use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    CloseIoRequest, DeleteProcessRequest, ExecProcessRequest, KillRequest, ResizePtyRequest, StartRequest, WaitRequest,
};
use prost_types::Any;
use tokio::net::unix::pipe;

use super::{Runtime, RuntimeError};

const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// What to run.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// argv; `args[0]` is looked up in the container's `PATH`.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries added to (or replacing those of) the container's environment.
    pub env: Vec<String>,
    /// `Some((columns, rows))`: a terminal of that size (stdout and stderr are then one stream).
    pub terminal: Option<(u32, u32)>,
}

/// A started process.
#[derive(Debug, Clone)]
pub struct ExecProcess {
    pub container_id: String,
    pub exec_id: String,
    pub pid: u32,
    fifo_dir: PathBuf,
}

/// Our ends of the process's stdio.
#[derive(Debug)]
pub struct ExecIo {
    pub stdin: pipe::Sender,
    pub stdout: pipe::Receiver,
    /// `None` with a terminal.
    pub stderr: Option<pipe::Receiver>,
}

fn io_error(what: &str, path: &Path, err: std::io::Error) -> RuntimeError {
    RuntimeError::Invalid(format!("exec stdio: cannot {what} {}: {err}", path.display()))
}

fn make_fifo(path: &Path) -> Result<(), RuntimeError> {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .map_err(|err| io_error("create the FIFO", path, err.into()))
}

/// The exec's process spec: the container's `process` with `options` applied.
fn process_spec(container_spec: &[u8], options: &ExecOptions) -> Result<Vec<u8>, RuntimeError> {
    let spec: serde_json::Value = serde_json::from_slice(container_spec)
        .map_err(|err| RuntimeError::Invalid(format!("the container's spec is not JSON: {err}")))?;
    let mut process = spec
        .get("process")
        .cloned()
        .filter(serde_json::Value::is_object)
        .ok_or_else(|| RuntimeError::Invalid("the container's spec has no process".into()))?;
    let mut env: Vec<String> = process
        .get("env")
        .and_then(|env| env.as_array())
        .map(|env| env.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    for entry in &options.env {
        let key = entry.split('=').next().unwrap_or_default();
        env.retain(|existing| existing.split('=').next() != Some(key));
        env.push(entry.clone());
    }
    let object = process.as_object_mut().expect("filtered on is_object above");
    object.insert("args".into(), serde_json::json!(options.args));
    object.insert("env".into(), serde_json::json!(env));
    object.insert("terminal".into(), serde_json::json!(options.terminal.is_some()));
    match options.terminal {
        Some((columns, rows)) => {
            object.insert(
                "consoleSize".into(),
                serde_json::json!({"height": rows, "width": columns}),
            );
        }
        None => {
            object.remove("consoleSize");
        }
    }
    serde_json::to_vec(&process).map_err(|err| RuntimeError::Invalid(format!("cannot encode the process spec: {err}")))
}

impl Runtime {
    /// Starts `options.args` in the running task of container `container_id` as `exec_id`
    /// (letters, digits, `.`, `_`, `-`), with stdio FIFOs in `fifo_dir` (created, mode 0700; it
    /// must not exist). On failure nothing is left behind.
    pub async fn exec(
        &self,
        container_id: &str,
        exec_id: &str,
        fifo_dir: &Path,
        options: &ExecOptions,
    ) -> Result<(ExecProcess, ExecIo), RuntimeError> {
        let (_, container_spec) = self
            .container(container_id)
            .await?
            .ok_or_else(|| RuntimeError::NotFound {
                operation: "Containers.Get",
                message: format!("container {container_id}"),
            })?;
        let spec = process_spec(&container_spec, options)?;
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(fifo_dir)
                .map_err(|err| io_error("create", fifo_dir, err))?;
        }
        let process = ExecProcess {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            pid: 0,
            fifo_dir: fifo_dir.to_path_buf(),
        };
        match self.start_exec(process.clone(), spec, options.terminal.is_some()).await {
            Ok(started) => Ok(started),
            Err(err) => {
                let _ = self.delete_exec(&process).await;
                Err(err)
            }
        }
    }

    async fn start_exec(
        &self,
        mut process: ExecProcess,
        spec: Vec<u8>,
        terminal: bool,
    ) -> Result<(ExecProcess, ExecIo), RuntimeError> {
        let stdin_path = process.fifo_dir.join("stdin");
        let stdout_path = process.fifo_dir.join("stdout");
        let stderr_path = process.fifo_dir.join("stderr");
        make_fifo(&stdin_path)?;
        make_fifo(&stdout_path)?;
        if !terminal {
            make_fifo(&stderr_path)?;
        }
        let read_write = || {
            let mut options = pipe::OpenOptions::new();
            options.read_write(true);
            options
        };
        let stdin = read_write()
            .open_sender(&stdin_path)
            .map_err(|err| io_error("open", &stdin_path, err))?;
        let stdout_holder = read_write()
            .open_receiver(&stdout_path)
            .map_err(|err| io_error("open", &stdout_path, err))?;
        let stderr_holder = if terminal {
            None
        } else {
            Some(
                read_write()
                    .open_receiver(&stderr_path)
                    .map_err(|err| io_error("open", &stderr_path, err))?,
            )
        };
        let path_string = |path: &Path| path.to_string_lossy().into_owned();
        TasksClient::new(self.channel())
            .exec(self.request(ExecProcessRequest {
                container_id: process.container_id.clone(),
                stdin: path_string(&stdin_path),
                stdout: path_string(&stdout_path),
                stderr: if terminal {
                    String::new()
                } else {
                    path_string(&stderr_path)
                },
                terminal,
                spec: Some(Any {
                    type_url: PROCESS_TYPE_URL.to_string(),
                    value: spec,
                }),
                exec_id: process.exec_id.clone(),
            }))
            .await
            .map_err(|status| RuntimeError::from_status("Tasks.Exec", &status))?;
        let started = TasksClient::new(self.channel())
            .start(self.request(StartRequest {
                container_id: process.container_id.clone(),
                exec_id: process.exec_id.clone(),
            }))
            .await
            .map_err(|status| RuntimeError::from_status("Tasks.Start", &status))?;
        process.pid = started.into_inner().pid;
        // The shim holds the write ends now: read-only ends see end of file when it is done.
        let stdout = pipe::OpenOptions::new()
            .open_receiver(&stdout_path)
            .map_err(|err| io_error("open", &stdout_path, err))?;
        drop(stdout_holder);
        let stderr = match stderr_holder {
            Some(holder) => {
                let stderr = pipe::OpenOptions::new()
                    .open_receiver(&stderr_path)
                    .map_err(|err| io_error("open", &stderr_path, err))?;
                drop(holder);
                Some(stderr)
            }
            None => None,
        };
        Ok((process, ExecIo { stdin, stdout, stderr }))
    }

    /// Waits until the process exits and returns its exit status (128 + signal when killed).
    pub async fn wait_exec(&self, process: &ExecProcess) -> Result<u32, RuntimeError> {
        let response = TasksClient::new(self.channel())
            .wait(self.request(WaitRequest {
                container_id: process.container_id.clone(),
                exec_id: process.exec_id.clone(),
            }))
            .await
            .map_err(|status| RuntimeError::from_status("Tasks.Wait", &status))?;
        Ok(response.into_inner().exit_status)
    }

    /// Resizes the process's terminal.
    pub async fn resize_exec_pty(&self, process: &ExecProcess, columns: u32, rows: u32) -> Result<(), RuntimeError> {
        TasksClient::new(self.channel())
            .resize_pty(self.request(ResizePtyRequest {
                container_id: process.container_id.clone(),
                exec_id: process.exec_id.clone(),
                width: columns,
                height: rows,
            }))
            .await
            .map_err(|status| RuntimeError::from_status("Tasks.ResizePty", &status))?;
        Ok(())
    }

    /// Sends `signal` to the process (not to the rest of the container).
    pub async fn kill_exec(&self, process: &ExecProcess, signal: u32) -> Result<(), RuntimeError> {
        TasksClient::new(self.channel())
            .kill(self.request(KillRequest {
                container_id: process.container_id.clone(),
                exec_id: process.exec_id.clone(),
                signal,
                all: false,
            }))
            .await
            .map_err(|status| RuntimeError::from_status("Tasks.Kill", &status))?;
        Ok(())
    }

    /// Ends the process's input (after our stdin end was dropped, the process reads end of file).
    pub async fn close_exec_stdin(&self, process: &ExecProcess) -> Result<(), RuntimeError> {
        TasksClient::new(self.channel())
            .close_io(self.request(CloseIoRequest {
                container_id: process.container_id.clone(),
                exec_id: process.exec_id.clone(),
                stdin: true,
            }))
            .await
            .map_err(|status| RuntimeError::from_status("Tasks.CloseIO", &status))?;
        Ok(())
    }

    /// Forgets an exited process in the shim and removes its FIFOs; what does not exist is fine.
    pub async fn delete_exec(&self, process: &ExecProcess) -> Result<(), RuntimeError> {
        let deleted = TasksClient::new(self.channel())
            .delete_process(self.request(DeleteProcessRequest {
                container_id: process.container_id.clone(),
                exec_id: process.exec_id.clone(),
            }))
            .await;
        let _ = std::fs::remove_dir_all(&process.fifo_dir);
        match deleted {
            Ok(_) => Ok(()),
            Err(status) => match RuntimeError::from_status("Tasks.DeleteProcess", &status) {
                RuntimeError::NotFound { .. } => Ok(()),
                err => Err(err),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_spec_is_the_containers_with_our_arguments() {
        let container = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"user": {"uid": 1000, "gid": 1000}, "args": ["httpd", "-f"], "cwd": "/srv",
                        "env": ["PATH=/bin", "TERM=dumb"], "noNewPrivileges": true,
                        "capabilities": {"bounding": ["CAP_CHOWN"]}},
            "root": {"path": "rootfs"}
        });
        let options = ExecOptions {
            args: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["TERM=xterm-256color".into()],
            terminal: Some((120, 40)),
        };
        let spec = process_spec(&serde_json::to_vec(&container).expect("json"), &options).expect("a spec");
        let process: serde_json::Value = serde_json::from_slice(&spec).expect("json");
        assert_eq!(process["args"], serde_json::json!(["/bin/sh", "-c", "echo hi"]));
        assert_eq!(process["env"], serde_json::json!(["PATH=/bin", "TERM=xterm-256color"]));
        assert_eq!(process["terminal"], true);
        assert_eq!(process["consoleSize"], serde_json::json!({"height": 40, "width": 120}));
        assert_eq!(process["user"]["uid"], 1000);
        assert_eq!(process["cwd"], "/srv");
        assert_eq!(process["noNewPrivileges"], true);
        assert_eq!(process["capabilities"]["bounding"][0], "CAP_CHOWN");
        let plain = ExecOptions {
            terminal: None,
            ..options
        };
        let spec = process_spec(&serde_json::to_vec(&container).expect("json"), &plain).expect("a spec");
        let process: serde_json::Value = serde_json::from_slice(&spec).expect("json");
        assert_eq!(process["terminal"], false);
        assert!(process.get("consoleSize").is_none());
        assert!(process_spec(b"{}", &plain).is_err());
    }
}
