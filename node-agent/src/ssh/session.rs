//! One SSH session channel: a process exec'd in the pod's container, its output sent to the
//! client as it comes, the client's input written to it, its exit status passed back.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use russh::ChannelId;
use russh::server::Handle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use uuid::Uuid;

use crate::runtime::Runtime;
use crate::runtime::exec::{ExecOptions, ExecProcess};

/// The shell of the pod's image that runs sessions.
const SHELL: &str = "/bin/sh";
/// How long output may trail the process's exit (the shim flushes its copies).
const OUTPUT_GRACE: Duration = Duration::from_secs(5);
const SIGKILL: u32 = 9;

/// What the client sends to a running process.
#[derive(Debug)]
pub enum Input {
    Data(Bytes),
    Eof,
}

/// What to run for a channel.
#[derive(Debug)]
pub struct SessionRequest {
    pub pod_id: Uuid,
    /// `None`: an interactive shell.
    pub command: Option<String>,
    /// `(TERM, columns, rows)` when the client asked for a terminal.
    pub pty: Option<(String, u32, u32)>,
    pub fifo_root: PathBuf,
}

/// Writes `message` to the client's stderr and ends the channel with status 1.
pub async fn refuse(handle: Handle, channel: ChannelId, message: String) {
    let _ = handle
        .extended_data(channel, 1, Bytes::from(format!("instapod: {message}\r\n")))
        .await;
    finish(&handle, channel, 1).await;
}

async fn finish(handle: &Handle, channel: ChannelId, status: u32) {
    let _ = handle.exit_status_request(channel, status).await;
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
}

/// Keeps the active-sessions gauge right however the session ends.
struct ActiveSession(#[allow(dead_code)] OwnedSemaphorePermit);

impl ActiveSession {
    fn new(permit: OwnedSemaphorePermit) -> ActiveSession {
        metrics::gauge!("instapod_node_agent_ssh_sessions_active").increment(1.0);
        ActiveSession(permit)
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        metrics::gauge!("instapod_node_agent_ssh_sessions_active").decrement(1.0);
    }
}

/// Runs the session to its end.
pub async fn run(
    runtime: Runtime,
    handle: Handle,
    channel: ChannelId,
    request: SessionRequest,
    input: mpsc::Receiver<Input>,
    resize: mpsc::UnboundedReceiver<(u32, u32)>,
    permit: OwnedSemaphorePermit,
) {
    let _active = ActiveSession::new(permit);
    let exec_id = format!("ssh-{}", &Uuid::new_v4().simple().to_string()[..16]);
    let args = match &request.command {
        Some(command) => vec![SHELL.to_string(), "-c".to_string(), command.clone()],
        None => vec![SHELL.to_string()],
    };
    let mut env = Vec::new();
    if let Some((term, _, _)) = &request.pty {
        env.push(format!("TERM={term}"));
    }
    let options = ExecOptions {
        args,
        env,
        terminal: request.pty.as_ref().map(|(_, columns, rows)| (*columns, *rows)),
    };
    let container_id = request.pod_id.to_string();
    let fifo_dir = request.fifo_root.join(&exec_id);
    let (process, io) = match runtime.exec(&container_id, &exec_id, &fifo_dir, &options).await {
        Ok(started) => started,
        Err(err) => {
            tracing::warn!(pod_id = %request.pod_id, error = %err, "cannot start an ssh session's process");
            metrics::counter!("instapod_node_agent_ssh_sessions_total", "outcome" => "error").increment(1);
            refuse(
                handle,
                channel,
                "the session could not be started in the pod (is it running?)".to_string(),
            )
            .await;
            return;
        }
    };
    let stdout = tokio::spawn(forward(io.stdout, handle.clone(), channel, None));
    let stderr = io
        .stderr
        .map(|stderr| tokio::spawn(forward(stderr, handle.clone(), channel, Some(1))));
    let (gone_tx, gone_rx) = oneshot::channel();
    let feeder = tokio::spawn(feed(runtime.clone(), process.clone(), io.stdin, input, gone_tx));
    let resizer = tokio::spawn(resize_loop(runtime.clone(), process.clone(), resize));
    let status = tokio::select! {
        status = runtime.wait_exec(&process) => status,
        _ = gone_rx => {
            // The client left: the process must not outlive its session.
            if let Err(err) = runtime.kill_exec(&process, SIGKILL).await {
                tracing::warn!(error = %err, exec_id = %process.exec_id, "cannot kill an abandoned ssh process");
            }
            runtime.wait_exec(&process).await
        }
    };
    feeder.abort();
    resizer.abort();
    let _ = tokio::time::timeout(OUTPUT_GRACE, stdout).await;
    if let Some(stderr) = stderr {
        let _ = tokio::time::timeout(OUTPUT_GRACE, stderr).await;
    }
    let status = match status {
        Ok(status) => status,
        Err(err) => {
            tracing::warn!(error = %err, exec_id = %process.exec_id, "lost the ssh process's exit status");
            255
        }
    };
    let outcome = match status {
        0 => "exited_zero",
        _ => "exited_nonzero",
    };
    metrics::counter!("instapod_node_agent_ssh_sessions_total", "outcome" => outcome).increment(1);
    tracing::info!(pod_id = %request.pod_id, exec_id = %process.exec_id, status, "ssh session ended");
    finish(&handle, channel, status).await;
    if let Err(err) = runtime.delete_exec(&process).await {
        tracing::warn!(error = %err, exec_id = %process.exec_id, "cannot delete an ssh session's process");
    }
}

/// Copies a process output to the channel (`ext`: the extended-data stream, 1 = stderr) until
/// the shim closes it.
async fn forward(mut output: pipe::Receiver, handle: Handle, channel: ChannelId, ext: Option<u32>) {
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        match output.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let chunk = Bytes::copy_from_slice(&buffer[..n]);
                let sent = match ext {
                    Some(ext) => handle.extended_data(channel, ext, chunk).await,
                    None => handle.data(channel, chunk).await,
                };
                if sent.is_err() {
                    return;
                }
            }
        }
    }
}

/// Writes the client's input to the process; on EOF closes its stdin; when the client is gone
/// (the input channel dropped) says so on `gone`.
async fn feed(
    runtime: Runtime,
    process: ExecProcess,
    stdin: pipe::Sender,
    mut input: mpsc::Receiver<Input>,
    gone: oneshot::Sender<()>,
) {
    let mut stdin = Some(stdin);
    loop {
        match input.recv().await {
            Some(Input::Data(bytes)) => {
                if let Some(writer) = stdin.as_mut()
                    && writer.write_all(&bytes).await.is_err()
                {
                    stdin = None;
                }
            }
            Some(Input::Eof) => {
                if stdin.take().is_some()
                    && let Err(err) = runtime.close_exec_stdin(&process).await
                {
                    tracing::debug!(error = %err, "cannot close an ssh process's stdin");
                }
            }
            None => {
                let _ = gone.send(());
                return;
            }
        }
    }
}

async fn resize_loop(runtime: Runtime, process: ExecProcess, mut sizes: mpsc::UnboundedReceiver<(u32, u32)>) {
    while let Some((columns, rows)) = sizes.recv().await {
        if let Err(err) = runtime.resize_exec_pty(&process, columns, rows).await {
            tracing::debug!(error = %err, "cannot resize an ssh session's terminal");
        }
    }
}
