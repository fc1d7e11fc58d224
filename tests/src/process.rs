//! Child processes of the harness: the per-binary temporary directory, free ports, finding
//! binaries, starting a service and waiting until it is ready ([`start_service`]), and the
//! watchdog that cleans up when the test binary exits.
//!
//! *Design.* A `Drop` on a static never runs at exit, `prctl(PR_SET_PDEATHSIG)` needs `unsafe`
//! (forbidden in this workspace), and a test binary can also die from a signal. So the first
//! process the harness starts is a watchdog: `bash` running a fixed script whose standard input
//! is a pipe held open by this process for its whole life. The harness writes one line per
//! child, `add <pid> <signal>` when it starts one and `del <pid> -` when it has reaped it. When
//! the test binary exits for any reason the kernel closes the pipe, `read` sees end-of-file,
//! and the watchdog signals every child still registered, waits briefly, kills leftovers and
//! removes the temporary directory. The script is a constant; pids and the directory reach it
//! only as data (a validated number, a positional argument), never as code. It ignores
//! SIGINT/SIGTERM/SIGHUP so that a Ctrl-C to the test run still leads to cleanup.
//!
//! *Limitations.* Between a child's exit and its `del` line the pid could in theory be reused;
//! children are reaped before `del` is written, so the window is the few microseconds between
//! `wait` returning and the write.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The watchdog's script. It receives the directory to remove as `$1`.
const WATCHDOG_SCRIPT: &str = r#"
trap '' INT TERM HUP
dir="$1"
declare -A signal_of
while read -r op pid sig; do
  [[ "$pid" =~ ^[0-9]+$ ]] || continue
  case "$op" in
    add) case "$sig" in KILL|TERM|INT|QUIT) signal_of[$pid]="$sig" ;; esac ;;
    del) unset "signal_of[$pid]" ;;
  esac
done
for pid in "${!signal_of[@]}"; do kill "-${signal_of[$pid]}" "$pid" 2>/dev/null; done
for _ in $(seq 50); do
  alive=0
  for pid in "${!signal_of[@]}"; do
    # A zombie (state Z) is dead already; its new parent may never reap it.
    state=Z
    [ -r "/proc/$pid/stat" ] && read -r _ _ state _ < "/proc/$pid/stat"
    [ "$state" != Z ] && alive=1
  done
  [ "$alive" = 0 ] && break
  sleep 0.1
done
for pid in "${!signal_of[@]}"; do kill -KILL "$pid" 2>/dev/null; done
sleep 0.2
rm -rf -- "$dir"
"#;

struct Harness {
    root: PathBuf,
    watchdog_stdin: Mutex<ChildStdin>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let root = std::env::temp_dir().join(format!(
            "instapod-tests-{}-{}",
            std::process::id(),
            crate::ids::random_suffix()
        ));
        fs::create_dir_all(&root).unwrap_or_else(|err| panic!("cannot create {}: {err}", root.display()));
        let bash = find_in_path("bash")
            .unwrap_or_else(|| panic!("the test harness needs `bash` in PATH for its cleanup watchdog"));
        let mut watchdog = Command::new(bash)
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("instapod-test-watchdog")
            .arg(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start the cleanup watchdog: {err}"));
        let stdin = watchdog
            .stdin
            .take()
            .expect("the watchdog was spawned with a piped stdin");
        // The watchdog outlives us on purpose; its `Child` handle is simply forgotten.
        drop(watchdog);
        Harness {
            root,
            watchdog_stdin: Mutex::new(stdin),
        }
    })
}

fn tell_watchdog(line: &str) {
    let mut stdin = harness()
        .watchdog_stdin
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // A failed write means the watchdog died; cleanup then falls back to Drop alone.
    let _ = writeln!(stdin, "{line}");
    let _ = stdin.flush();
}

/// How the watchdog should stop a child at exit.
#[derive(Debug, Clone, Copy)]
pub enum StopSignal {
    /// SIGQUIT: Postgres's immediate shutdown, which also ends its backends.
    Quit,
    /// SIGKILL.
    Kill,
}

/// Registers a child with the watchdog so it is stopped when the test binary exits.
pub fn register_child(child: &Child, signal: StopSignal) {
    register_pid(child.id(), signal);
}

/// Registers any process (e.g. a grandchild such as the Chromium that chromedriver starts)
/// with the watchdog so it is stopped when the test binary exits.
pub fn register_pid(pid: u32, signal: StopSignal) {
    let name = match signal {
        StopSignal::Quit => "QUIT",
        StopSignal::Kill => "KILL",
    };
    tell_watchdog(&format!("add {pid} {name}"));
}

/// Tells the watchdog that a child has been reaped (or a registered process has exited) and
/// must not be signalled any more.
pub fn unregister_child(pid: u32) {
    tell_watchdog(&format!("del {pid} -"));
}

/// Kills a child, reaps it and unregisters it from the watchdog.
pub fn kill_and_reap(child: &mut Child) {
    let pid = child.id();
    let _ = child.kill();
    let _ = child.wait();
    unregister_child(pid);
}

/// A fresh directory under the test binary's temporary root, removed when the binary exits.
pub fn temp_dir(label: &str) -> PathBuf {
    let dir = harness().root.join(format!("{label}-{}", crate::ids::random_suffix()));
    fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("cannot create {}: {err}", dir.display()));
    dir
}

/// A TCP port on 127.0.0.1 that was free a moment ago, and that this process has not handed
/// out before: the kernel may give a released port to the next `bind(0)`, and two nodes of the
/// tests running in parallel in one binary would then be told the same port (one's SSH
/// gateway answered by the other's HTTP metrics listener).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    never_twice(&HANDED_OUT, || {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 never fails");
        Some(listener.local_addr().expect("a bound listener has an address").port())
    })
}

/// The first value `draw` offers (`None`: that draw is unusable) that is not in `handed_out`,
/// which then records it: a resource chosen at random (a port, a subnet) is never given to two
/// tests of one process.
pub fn never_twice<T: PartialEq + Copy>(handed_out: &Mutex<Vec<T>>, mut draw: impl FnMut() -> Option<T>) -> T {
    let mut handed_out = handed_out.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        if let Some(value) = draw()
            && !handed_out.contains(&value)
        {
            handed_out.push(value);
            return value;
        }
    }
}

/// The first executable called `name` in `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Whether `path` is a regular file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The last `max_lines` lines of a log file, for failure messages.
pub fn log_tail(path: &Path, max_lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            lines[start..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

/// Opens `path` for a child's stdout and stderr (both into one file).
pub fn log_file_stdio(path: &Path) -> (Stdio, Stdio) {
    let file = fs::File::create(path).unwrap_or_else(|err| panic!("cannot create log file {}: {err}", path.display()));
    let clone = file
        .try_clone()
        .unwrap_or_else(|err| panic!("cannot duplicate log file {}: {err}", path.display()));
    (Stdio::from(file), Stdio::from(clone))
}

/// Removes every `INSTAPOD_*` variable this process inherited, so a developer's or CI's
/// environment cannot change what a child control plane is configured with.
pub fn clear_instapod_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("INSTAPOD_") {
            command.env_remove(key);
        }
    }
}

/// A service process the harness started: killed on [`stop`](Self::stop) or drop, with its log.
#[derive(Debug)]
pub struct ServiceProcess {
    child: Mutex<Option<Child>>,
    log_path: PathBuf,
}

impl ServiceProcess {
    pub fn new(child: Child, log_path: PathBuf) -> Self {
        ServiceProcess {
            child: Mutex::new(Some(child)),
            log_path,
        }
    }

    /// The last lines of its log.
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Child::id)
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path, 50)
    }

    /// Stops it immediately (SIGKILL); later connections are refused.
    pub fn stop(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut child) = child.take() {
            kill_and_reap(&mut child);
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `command` (stdin closed, stdout and stderr into `log_path`), registered for
/// clean-up, and waits until `ready` holds ([`wait_ready`], `what` naming it): the running
/// service, or why it is not running, with the tail of its log (the process is then gone).
/// Callers retry with fresh ports, since a port chosen free may be taken before the bind.
pub fn start_service(
    what: &str,
    command: &mut Command,
    log_path: PathBuf,
    timeout: Duration,
    ready: impl FnMut() -> bool,
) -> Result<ServiceProcess, String> {
    let (stdout, stderr) = log_file_stdio(&log_path);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {}: {err}", command.get_program().to_string_lossy()));
    register_child(&child, StopSignal::Kill);
    match wait_ready(what, &mut child, timeout, ready) {
        Ok(()) => Ok(ServiceProcess::new(child, log_path)),
        Err(problem) => {
            kill_and_reap(&mut child);
            Err(format!("{problem}\n{}", log_tail(&log_path, 50)))
        }
    }
}

/// Polls `ready` every 50 ms until it holds. Fails when `child` exits first or `timeout` passes;
/// `what` names the service in the message.
pub fn wait_ready(
    what: &str,
    child: &mut Child,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} exited early ({status})"));
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{what} not ready after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..300).map(|_| super::free_port()).collect();
        let unique: std::collections::HashSet<&u16> = ports.iter().collect();
        assert_eq!(unique.len(), ports.len());
    }
}
