//! A private containerd for the node-agent tests: its own config file, root, state and socket
//! under the test binary's temporary directory, never the system's `/run/containerd/containerd.sock`.
//!
//! containerd must run as root (it mounts overlayfs snapshots and creates cgroups), so the
//! harness panics with a message when it is not root. The CRI plugin and the snapshotters that
//! cannot work here (aufs, btrfs, zfs, devmapper) are disabled; images are unpacked with
//! `overlayfs`, containers run with runc through `io.containerd.runc.v2`.
//!
//! *Limitations.* containerd 1.6 keeps a few paths that its config cannot move: shim sockets
//! in `/run/containerd/s/` (named by a hash that includes our socket path, so they never clash),
//! runc's state in `/run/containerd/runc/<namespace>/<container id>` and `ctr`'s FIFOs in
//! `/run/containerd/fifo/`. Two containerds with the same namespace and container id would meet
//! in runc's state directory, so tests use unique container ids. Shims of containers still
//! running when the test binary exits are not stopped by the watchdog (they are not our
//! children); tests remove what they start (`ctr run --rm`).

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::process::{self, ServiceProcess, StopSignal};

/// The containerd namespace the harness's own checks use.
pub const TEST_NAMESPACE: &str = "instapod-test";

/// The plugins the private containerd does not load.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
];

/// A running containerd. Dropping it stops the daemon.
#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    process: ServiceProcess,
}

/// The containerd shared by every test of this binary, started on first use.
pub fn shared() -> &'static Containerd {
    static SHARED: OnceLock<Containerd> = OnceLock::new();
    SHARED.get_or_init(Containerd::start)
}

/// The `containerd` binary, or a panic that says what to install.
fn containerd_binary() -> PathBuf {
    process::find_in_path("containerd").unwrap_or_else(|| {
        panic!("`containerd` not found in PATH; install it (Debian: `apt-get install containerd runc`, or scripts/install-deps)")
    })
}

/// The `ctr` client binary, or a panic that says what to install.
pub fn ctr_binary() -> PathBuf {
    process::find_in_path("ctr").unwrap_or_else(|| {
        panic!("`ctr` not found in PATH; it comes with containerd (Debian: `apt-get install containerd`)")
    })
}

/// Panics unless the runtime pieces containerd needs to run a container are installed.
fn check_runtime_installed() {
    for (name, package) in [("runc", "runc"), ("containerd-shim-runc-v2", "containerd")] {
        if process::find_in_path(name).is_none() {
            panic!("`{name}` not found in PATH; install it (Debian: `apt-get install {package}`)");
        }
    }
}

fn running_as_root() -> bool {
    // The owner of /proc/self is the effective uid; this avoids `libc::geteuid` (unsafe).
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").map(|meta| meta.uid() == 0).unwrap_or(false)
}

/// A TOML basic string: quoted, with `\` and `"` escaped (paths are data, not syntax).
fn toml_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The config file of a private containerd living in `dir`.
pub fn config_toml(dir: &Path, socket: &Path) -> String {
    let path = |p: &Path| toml_string(&p.to_string_lossy());
    let disabled: Vec<String> = DISABLED_PLUGINS.iter().map(|p| toml_string(p)).collect();
    format!(
        "# A private containerd started by the Instapod test harness.\n\
         version = 2\n\
         root = {root}\n\
         state = {state}\n\
         disabled_plugins = [{disabled}]\n\
         \n\
         [grpc]\n\
         address = {socket}\n\
         \n\
         [ttrpc]\n\
         address = {ttrpc}\n\
         \n\
         [debug]\n\
         address = \"\"\n\
         level = \"info\"\n\
         \n\
         [metrics]\n\
         address = \"\"\n\
         \n\
         [plugins.\"io.containerd.internal.v1.opt\"]\n\
         path = {opt}\n",
        root = path(&dir.join("root")),
        state = path(&dir.join("state")),
        disabled = disabled.join(", "),
        socket = path(socket),
        ttrpc = path(&socket.with_extension("sock.ttrpc")),
        opt = path(&dir.join("opt")),
    )
}

impl Containerd {
    /// The daemon's process id (benchmarks read its CPU time).
    pub fn pid(&self) -> u32 {
        self.process.pid().expect("containerd runs while the harness holds it")
    }

    /// Starts a new containerd and waits until its socket accepts connections. Panics with its
    /// log otherwise.
    pub fn start() -> Containerd {
        if !running_as_root() {
            panic!("the containerd tests must run as root: containerd mounts snapshots and creates cgroups");
        }
        let binary = containerd_binary();
        check_runtime_installed();
        let dir = process::temp_dir("containerd");
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        fs::write(&config, config_toml(&dir, &socket))
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", config.display()));
        let log_path = dir.join("containerd.log");
        let (stdout, stderr) = process::log_file_stdio(&log_path);
        let mut child = Command::new(&binary)
            .arg("--config")
            .arg(&config)
            .env("TMPDIR", &dir)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
        process::register_child(&child, StopSignal::Kill);
        if let Err(problem) = process::wait_ready("containerd", &mut child, Duration::from_secs(30), || {
            UnixStream::connect(&socket).is_ok()
        }) {
            process::kill_and_reap(&mut child);
            panic!(
                "containerd did not start: {problem}\n{}",
                process::log_tail(&log_path, 50)
            );
        }
        Containerd {
            dir,
            socket,
            process: ServiceProcess::new(child, log_path),
        }
    }

    /// The path of its gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The directory that holds its config, root, state and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A `ctr` command already pointed at this containerd and at `namespace`; add the
    /// subcommand and its arguments. Test code only: the node agent talks gRPC.
    pub fn ctr(&self, namespace: &str) -> Command {
        let mut command = Command::new(ctr_binary());
        command
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(namespace)
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("CONTAINERD_SNAPSHOTTER")
            .stdin(Stdio::null());
        command
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Stops the daemon immediately (SIGKILL).
    pub fn stop(&self) {
        self.process.stop();
    }
}
