//! The stock OpenSSH client against a node agent's SSH gateway: key pairs made with
//! `ssh-keygen`, `ssh` invocations that never touch the user's own configuration (no agent, no
//! known-hosts file, batch mode, only the given key), and a pseudo-terminal driver (Python's
//! `pty`) for interactive sessions with a real window size.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// The longest one `ssh` run may take in a test.
pub const SSH_TIMEOUT: Duration = Duration::from_secs(60);

/// A key pair in a private directory: `path` (private) and `path.pub`.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub path: PathBuf,
    /// The `.pub` line.
    pub public: String,
}

/// Makes a key pair with `ssh-keygen -t <kind> [-b <bits>]` in `dir`.
pub fn keygen(dir: &Path, name: &str, kind: &str, bits: Option<u32>) -> anyhow::Result<KeyPair> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    let mut command = std::process::Command::new("ssh-keygen");
    command.args(["-q", "-t", kind, "-N", "", "-C", &format!("{name}@instapod-test"), "-f"]);
    command.arg(&path);
    if let Some(bits) = bits {
        command.args(["-b", &bits.to_string()]);
    }
    let output = command.stdin(Stdio::null()).output().context("running ssh-keygen")?;
    if !output.status.success() {
        bail!(
            "ssh-keygen -t {kind} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let public = std::fs::read_to_string(path.with_extension("pub"))?.trim().to_string();
    Ok(KeyPair { path, public })
}

/// The fingerprint `ssh-keygen -lf` prints for a public key file (`SHA256:…`).
pub fn fingerprint(public_key_file: &Path) -> anyhow::Result<String> {
    let output = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(public_key_file)
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("no fingerprint in {text:?}"))
}

/// The options every test `ssh` gets: no host-key prompts or files, no agent, no password
/// prompts, only the given identity.
pub fn base_args(port: u16, identity: &Path) -> Vec<String> {
    [
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=20",
        "-p",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([port.to_string(), "-i".to_string(), identity.display().to_string()])
    .collect()
}

/// Runs `ssh [extra...] user@127.0.0.1 command` with no input; its output and status.
pub async fn run(port: u16, identity: &Path, extra: &[&str], user: &str, command: &str) -> anyhow::Result<Output> {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(base_args(port, identity))
        .args(extra)
        .arg(format!("{user}@127.0.0.1"))
        .arg(command)
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(SSH_TIMEOUT, cmd.output())
        .await
        .context("ssh timed out")??;
    Ok(output)
}

/// The host key fingerprint the gateway on `port` presents (`ssh-keyscan` + `ssh-keygen -lf`).
pub async fn host_fingerprint(port: u16) -> anyhow::Result<String> {
    let output = tokio::process::Command::new("ssh-keyscan")
        .args(["-T", "10", "-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"])
        .stdin(Stdio::null())
        .output()
        .await?;
    let scanned = String::from_utf8_lossy(&output.stdout);
    let line = scanned
        .lines()
        .find(|l| l.contains("ssh-ed25519"))
        .with_context(|| format!("ssh-keyscan found no ed25519 key: {scanned:?}"))?;
    let file = std::env::temp_dir().join(format!("hostkey-{}.pub", uuid::Uuid::new_v4()));
    let key = line.split_whitespace().skip(1).collect::<Vec<_>>().join(" ");
    std::fs::write(&file, key)?;
    let fingerprint = fingerprint(&file);
    let _ = std::fs::remove_file(&file);
    fingerprint
}

/// The Python program that drives `ssh -tt` in a real pseudo-terminal: the child's terminal
/// starts at ROWS x COLUMNS; each step is `send:<text>` (a line, `\n` appended), `expect:<text>`
/// (wait up to 20 s for it in the output since the last step), or `resize:<rows>x<columns>`
/// (the terminal is resized, which sends ssh SIGWINCH). Prints everything read, then
/// `\n@@STATUS <n>`.
const PTY_DRIVER: &str = r#"
import os, pty, sys, time, fcntl, termios, struct, select
rows, cols = int(sys.argv[1]), int(sys.argv[2])
steps = sys.argv[3].split('\x1f')
argv = sys.argv[4:]
pid, fd = pty.fork()
if pid == 0:
    fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack('HHHH', rows, cols, 0, 0))
    os.execvp(argv[0], argv)
seen = b''
since = 0
def read_some(timeout):
    global seen
    r, _, _ = select.select([fd], [], [], timeout)
    if r:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return False
        if not data:
            return False
        seen += data
    return True
for step in steps:
    kind, _, arg = step.partition(':')
    if kind == 'send':
        os.write(fd, arg.encode() + b'\n')
    elif kind == 'resize':
        r, c = arg.split('x')
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack('HHHH', int(r), int(c), 0, 0))
    elif kind == 'expect':
        deadline = time.time() + 20
        while arg.encode() not in seen[since:] and time.time() < deadline:
            if not read_some(0.2):
                break
        if arg.encode() not in seen[since:]:
            sys.stdout.write(seen.decode('utf-8', 'replace'))
            sys.stdout.write('\n@@TIMEOUT waiting for %r\n' % arg)
            os.kill(pid, 9)
            sys.exit(2)
        since = seen.index(arg.encode(), since) + len(arg)
deadline = time.time() + 20
while time.time() < deadline:
    if not read_some(0.2):
        break
_, status = os.waitpid(pid, 0)
sys.stdout.write(seen.decode('utf-8', 'replace'))
sys.stdout.write('\n@@STATUS %d\n' % (os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1))
"#;

/// Drives an interactive `ssh -tt` session through [`PTY_DRIVER`]; returns what the terminal
/// showed and ssh's exit status.
pub async fn interactive(
    port: u16,
    identity: &Path,
    user: &str,
    size: (u16, u16),
    steps: &[String],
) -> anyhow::Result<(String, i32)> {
    let mut ssh_argv = vec!["ssh".to_string(), "-tt".to_string()];
    ssh_argv.extend(base_args(port, identity));
    ssh_argv.push(format!("{user}@127.0.0.1"));
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("python3")
            .arg("-c")
            .arg(PTY_DRIVER)
            .arg(size.0.to_string())
            .arg(size.1.to_string())
            .arg(steps.join("\u{1f}"))
            .args(&ssh_argv)
            .env_remove("SSH_AUTH_SOCK")
            // What the client sends in its pty request (checked inside the pod).
            .env("TERM", "xterm-256color")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the pty driver timed out")??;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let status = text
        .rsplit_once("@@STATUS ")
        .and_then(|(_, rest)| rest.trim().parse::<i32>().ok())
        .with_context(|| {
            format!(
                "the session did not finish: {text}\nstderr: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    Ok((text, status))
}
