//! Turning a pod spec and its image's defaults into an OCI runtime spec (the `oci-spec` crate).
//!
//! *Invariants.* Every pod gets its own pid, ipc, uts, mount and network namespaces (the
//! network namespace is the pod's, joined by path); no host namespace is ever shared. The only
//! bind mounts are the pod's volume and two read-only files the agent generates for the pod
//! (`/etc/hosts` and `/etc/resolv.conf`), all under the agent's per-pod directories; nothing
//! else of the host is mounted. The process runs with `no_new_privileges`, a fixed capability
//! set (Docker's default without `NET_RAW` and `MKNOD`), the default masked and read-only
//! `/proc` paths, and a device cgroup that denies everything but the usual character devices.
//! Limits: CFS quota from the CPU millicores (and shares in proportion), memory with no swap
//! beyond it, and a pids limit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use instapod_common::node::{PodSpec, Resources};
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResources,
    LinuxResourcesBuilder, Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use crate::image::manifest::RunDefaults;

/// The CFS period the quota is expressed against (100 ms).
const CFS_PERIOD_US: u64 = 100_000;
/// Smallest and largest limits the agent accepts (anything else is an absurd spec).
pub const MIN_MEMORY_BYTES: u64 = 8 * 1024 * 1024;
pub const MIN_CPU_MILLIS: u32 = 10;
pub const MIN_PIDS: u32 = 8;
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the host side of a pod lives.
#[derive(Debug, Clone)]
pub struct PodPaths {
    pub netns: PathBuf,
    pub volume: PathBuf,
    pub hosts_file: PathBuf,
    pub resolv_file: PathBuf,
}

/// Why a spec cannot be built; meant for users.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("bad command: {0}")]
    Command(String),
    #[error("bad environment variable {0:?}: names are non-empty, without '=' or NUL")]
    Env(String),
    #[error("bad volume mount path {0:?}: it must be an absolute path outside /proc, /sys and /dev")]
    VolumeMount(String),
    #[error("bad working directory {0:?}: it must be an absolute path")]
    Workdir(String),
    #[error("resources out of range: {0}")]
    Resources(String),
    #[error("cannot build the runtime spec: {0}")]
    Build(String),
}

/// Checks limits against what the node can give (`max`).
pub fn check_resources(resources: &Resources, max: &Resources) -> Result<(), SpecError> {
    let mut problems = Vec::new();
    if resources.cpu_millis < MIN_CPU_MILLIS || resources.cpu_millis > max.cpu_millis {
        problems.push(format!(
            "cpu_millis {} not in {MIN_CPU_MILLIS}..={}",
            resources.cpu_millis, max.cpu_millis
        ));
    }
    if resources.memory_bytes < MIN_MEMORY_BYTES || resources.memory_bytes > max.memory_bytes {
        problems.push(format!(
            "memory_bytes {} not in {MIN_MEMORY_BYTES}..={}",
            resources.memory_bytes, max.memory_bytes
        ));
    }
    if resources.pids < MIN_PIDS || resources.pids > max.pids {
        problems.push(format!("pids {} not in {MIN_PIDS}..={}", resources.pids, max.pids));
    }
    if resources.disk_bytes > max.disk_bytes {
        problems.push(format!(
            "disk_bytes {} exceeds {}",
            resources.disk_bytes, max.disk_bytes
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(SpecError::Resources(problems.join("; ")))
    }
}

/// The process's argv: Docker's rules (an overridden entrypoint drops the image's cmd).
pub fn argv(spec: &PodSpec, image: &RunDefaults) -> Result<Vec<String>, SpecError> {
    let entrypoint = spec
        .entrypoint
        .clone()
        .or_else(|| image.entrypoint.clone())
        .unwrap_or_default();
    let cmd = match (&spec.command, &spec.entrypoint) {
        (Some(cmd), _) => cmd.clone(),
        (None, Some(_)) => Vec::new(),
        (None, None) => image.cmd.clone().unwrap_or_default(),
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() || args[0].is_empty() {
        return Err(SpecError::Command(
            "the image defines no command and the pod gives none".to_string(),
        ));
    }
    if args.iter().any(|a| a.contains('\0')) {
        return Err(SpecError::Command("an argument contains a NUL byte".to_string()));
    }
    Ok(args)
}

fn environment(spec: &PodSpec, image: &RunDefaults) -> Result<Vec<String>, SpecError> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut put = |key: String, value: String, env: &mut BTreeMap<String, String>| {
        if !env.contains_key(&key) {
            order.push(key.clone());
        }
        env.insert(key, value);
    };
    for entry in image.env.clone().unwrap_or_default() {
        let (key, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
        put(key.to_string(), value.to_string(), &mut env);
    }
    if !env.contains_key("PATH") {
        let (key, value) = DEFAULT_PATH.split_once('=').unwrap_or(("PATH", ""));
        put(key.to_string(), value.to_string(), &mut env);
    }
    put("HOSTNAME".to_string(), spec.name.clone(), &mut env);
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(SpecError::Env(key.clone()));
        }
        put(key.clone(), value.clone(), &mut env);
    }
    Ok(order.into_iter().map(|k| format!("{k}={}", env[&k])).collect())
}

fn valid_volume_mount(path: &str) -> bool {
    let p = Path::new(path);
    p.is_absolute()
        && path != "/"
        && !p.components().any(|c| matches!(c, std::path::Component::ParentDir))
        && !["/proc", "/sys", "/dev"].iter().any(|bad| p.starts_with(bad))
        && !path.contains('\0')
}

/// The `linux.resources` of a pod with these limits.
pub fn resources(resources: &Resources, with_devices: bool) -> Result<LinuxResources, SpecError> {
    let build = |e: oci_spec::OciSpecError| SpecError::Build(e.to_string());
    let quota = (u64::from(resources.cpu_millis) * CFS_PERIOD_US / 1000).max(1000);
    let shares = (u64::from(resources.cpu_millis) * 1024 / 1000).max(2);
    let memory = i64::try_from(resources.memory_bytes).map_err(|_| SpecError::Resources("memory too large".into()))?;
    let mut builder = LinuxResourcesBuilder::default()
        .cpu(
            LinuxCpuBuilder::default()
                .quota(quota as i64)
                .period(CFS_PERIOD_US)
                .shares(shares)
                .build()
                .map_err(build)?,
        )
        .memory(
            LinuxMemoryBuilder::default()
                .limit(memory)
                .swap(memory)
                .build()
                .map_err(build)?,
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(i64::from(resources.pids))
                .build()
                .map_err(build)?,
        );
    if with_devices {
        let mut rules = vec![
            LinuxDeviceCgroupBuilder::default()
                .allow(false)
                .access("rwm")
                .build()
                .map_err(build)?,
        ];
        // null, zero, full, random, urandom, tty, console, ptmx, and the pts.
        for (major, minor) in [
            (1, Some(3)),
            (1, Some(5)),
            (1, Some(7)),
            (1, Some(8)),
            (1, Some(9)),
            (5, Some(0)),
            (5, Some(1)),
            (5, Some(2)),
            (136, None),
        ] {
            let mut rule = LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(LinuxDeviceType::C)
                .major(major)
                .access("rwm");
            if let Some(minor) = minor {
                rule = rule.minor(minor);
            }
            rules.push(rule.build().map_err(build)?);
        }
        builder = builder.devices(rules);
    }
    builder.build().map_err(build)
}

fn bind(destination: &str, source: &Path, readonly: bool) -> Result<Mount, SpecError> {
    let mut options = vec!["rbind".to_string(), "nosuid".to_string(), "nodev".to_string()];
    options.push(if readonly { "ro" } else { "rw" }.to_string());
    MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(options)
        .build()
        .map_err(|e| SpecError::Build(e.to_string()))
}

/// The OCI runtime spec of `pod`, as JSON.
pub fn build(pod: &PodSpec, image: &RunDefaults, paths: &PodPaths, cgroup_parent: &str) -> Result<Vec<u8>, SpecError> {
    let build = |e: oci_spec::OciSpecError| SpecError::Build(e.to_string());
    let args = argv(pod, image)?;
    let env = environment(pod, image)?;
    if !valid_volume_mount(&pod.volume_mount) {
        return Err(SpecError::VolumeMount(pod.volume_mount.clone()));
    }
    let cwd = pod
        .workdir
        .clone()
        .or_else(|| image.working_dir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".to_string());
    if !cwd.starts_with('/') || cwd.contains('\0') {
        return Err(SpecError::Workdir(cwd));
    }
    let (uid, gid) = numeric_user(image.user.as_deref());
    let caps: std::collections::HashSet<Capability> = [
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fsetid,
        Capability::Fowner,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setfcap,
        Capability::Setpcap,
        Capability::NetBindService,
        Capability::SysChroot,
        Capability::Kill,
        Capability::AuditWrite,
    ]
    .into_iter()
    .collect();
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(uid).gid(gid).build().map_err(build)?)
        .args(args)
        .env(env)
        .cwd(cwd)
        .no_new_privileges(true)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .build()
                .map_err(build)?,
        )
        .build()
        .map_err(build)?;
    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ]
    .into_iter()
    .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
    .chain(std::iter::once(
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Network)
            .path(paths.netns.clone())
            .build(),
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(build)?;
    let defaults = oci_spec::runtime::Linux::default();
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources(&pod.resources, true)?)
        .cgroups_path(PathBuf::from(format!("{cgroup_parent}/{}", pod.pod_id)))
        .masked_paths(defaults.masked_paths().clone().unwrap_or_default())
        .readonly_paths(defaults.readonly_paths().clone().unwrap_or_default())
        .build()
        .map_err(build)?;
    let mut mounts = oci_spec::runtime::get_default_mounts();
    mounts.push(bind(&pod.volume_mount, &paths.volume, false)?);
    mounts.push(bind("/etc/hosts", &paths.hosts_file, true)?);
    mounts.push(bind("/etc/resolv.conf", &paths.resolv_file, true)?);
    let mut spec = Spec::default();
    spec.set_process(Some(process))
        .set_root(Some(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()
                .map_err(build)?,
        ))
        .set_hostname(Some(pod.name.clone()))
        .set_mounts(Some(mounts))
        .set_linux(Some(linux));
    serde_json::to_vec(&spec).map_err(|e| SpecError::Build(e.to_string()))
}

/// `uid[:gid]` when numeric; a named user (which needs the image's `/etc/passwd`) runs as root.
fn numeric_user(user: Option<&str>) -> (u32, u32) {
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return (0, 0);
    };
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    match (u.parse::<u32>(), g.parse::<u32>()) {
        (Ok(uid), Ok(gid)) => (uid, gid),
        (Ok(uid), Err(_)) => (uid, uid),
        _ => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use instapod_common::node::RestartPolicy;

    fn pod() -> PodSpec {
        PodSpec {
            pod_id: uuid::Uuid::nil(),
            name: "web".into(),
            generation: 1,
            image: "busybox".into(),
            registry_auth: None,
            entrypoint: None,
            command: None,
            env: BTreeMap::from([("A".to_string(), "pod".to_string())]),
            workdir: None,
            resources: Resources {
                cpu_millis: 500,
                memory_bytes: 64 << 20,
                disk_bytes: 1 << 30,
                pids: 128,
            },
            volume_mount: "/data".into(),
            restart_policy: RestartPolicy::Always,
            http_port: Some(8080),
            hostnames: Vec::new(),
            volume_source: None,
        }
    }

    fn paths() -> PodPaths {
        PodPaths {
            netns: "/run/netns/p".into(),
            volume: "/var/lib/instapod/volumes/p".into(),
            hosts_file: "/var/lib/instapod/pods/p/hosts".into(),
            resolv_file: "/var/lib/instapod/pods/p/resolv.conf".into(),
        }
    }

    fn image() -> RunDefaults {
        RunDefaults {
            entrypoint: Some(vec!["/bin/httpd".into()]),
            cmd: Some(vec!["-f".into()]),
            env: Some(vec!["A=image".into(), "B=image".into()]),
            working_dir: Some("/www".into()),
            user: None,
        }
    }

    #[test]
    fn the_spec_isolates_limits_and_mounts_only_the_pods_own_paths() {
        let json: serde_json::Value =
            serde_json::from_slice(&build(&pod(), &image(), &paths(), "/instapod").expect("builds")).expect("json");
        assert_eq!(json["hostname"], "web");
        assert_eq!(json["root"]["path"], "rootfs");
        assert_eq!(json["process"]["args"], serde_json::json!(["/bin/httpd", "-f"]));
        assert_eq!(json["process"]["cwd"], "/www");
        assert_eq!(json["process"]["noNewPrivileges"], true);
        let env: Vec<String> = serde_json::from_value(json["process"]["env"].clone()).expect("env");
        assert!(
            env.contains(&"A=pod".to_string()) && env.contains(&"B=image".to_string()),
            "{env:?}"
        );
        let caps: Vec<String> =
            serde_json::from_value(json["process"]["capabilities"]["bounding"].clone()).expect("caps");
        assert!(
            !caps
                .iter()
                .any(|c| c == "CAP_SYS_ADMIN" || c == "CAP_NET_RAW" || c == "CAP_NET_ADMIN"),
            "{caps:?}"
        );
        let ns = json["linux"]["namespaces"].as_array().expect("namespaces");
        assert_eq!(ns.len(), 5);
        let net = ns.iter().find(|n| n["type"] == "network").expect("network namespace");
        assert_eq!(net["path"], "/run/netns/p");
        assert!(
            ns.iter()
                .filter(|n| n["type"] != "network")
                .all(|n| n.get("path").is_none())
        );
        let res = &json["linux"]["resources"];
        assert_eq!(res["cpu"]["quota"], 50_000);
        assert_eq!(res["cpu"]["period"], 100_000);
        assert_eq!(res["memory"]["limit"], 64 << 20);
        assert_eq!(res["memory"]["swap"], 64 << 20);
        assert_eq!(res["pids"]["limit"], 128);
        assert_eq!(res["devices"][0]["allow"], false);
        assert_eq!(json["linux"]["cgroupsPath"], format!("/instapod/{}", uuid::Uuid::nil()));
        assert!(
            json["linux"]["maskedPaths"]
                .as_array()
                .is_some_and(|m| m.iter().any(|p| p == "/proc/kcore"))
        );
        let binds: Vec<&serde_json::Value> = json["mounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .filter(|m| m["type"] == "bind")
            .collect();
        assert_eq!(binds.len(), 3);
        for mount in binds {
            let source = mount["source"].as_str().expect("source");
            assert!(source.starts_with("/var/lib/instapod/"), "{source}");
        }
    }

    #[test]
    fn an_overridden_entrypoint_drops_the_images_cmd() {
        let mut p = pod();
        p.entrypoint = Some(vec!["/bin/sh".into()]);
        assert_eq!(argv(&p, &image()).expect("argv"), vec!["/bin/sh".to_string()]);
        p.command = Some(vec!["-c".into(), "echo hi".into()]);
        assert_eq!(argv(&p, &image()).expect("argv"), vec!["/bin/sh", "-c", "echo hi"]);
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        let mut p = pod();
        assert!(matches!(argv(&p, &RunDefaults::default()), Err(SpecError::Command(_))));
        p.env.insert("A=B".into(), "x".into());
        assert!(matches!(build(&p, &image(), &paths(), "/i"), Err(SpecError::Env(_))));
        for bad in ["data", "/", "/proc/x", "/sys", "/dev/shm", "/a/../proc"] {
            let mut p = pod();
            p.volume_mount = bad.into();
            assert!(
                matches!(build(&p, &image(), &paths(), "/i"), Err(SpecError::VolumeMount(_))),
                "{bad}"
            );
        }
        let max = Resources {
            cpu_millis: 2000,
            memory_bytes: 1 << 30,
            disk_bytes: 10 << 30,
            pids: 4096,
        };
        let mut absurd = pod().resources;
        absurd.memory_bytes = 1 << 50;
        assert!(matches!(check_resources(&absurd, &max), Err(SpecError::Resources(_))));
        assert!(check_resources(&pod().resources, &max).is_ok());
    }
}
