//! The node agent's pod manager against real containerd, runc and CNI plugins: images pulled
//! from the harness registry or imported from a tarball, pods that serve HTTP on their own IP,
//! volumes that outlive stop/start and vanish on delete, limits the kernel enforces, pods that
//! cannot reach each other, restart policies, and bad specs that fail cleanly.

use std::path::Path;
use std::time::Duration;

use instapod_common::node::{NodeJob, NodePodState, PodReport, PodSpec, Resources, RestartPolicy};
use instapod_node_agent::pods::Outcome;
use instapod_node_agent::runtime::containers::TaskState;
use instapod_tests::images::ImageBuilder;
use instapod_tests::node::{TestNode, pod_spec, web_image};
use instapod_tests::{eventually, process};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

fn http() -> reqwest::Client {
    instapod_tests::http_builder()
        .no_proxy()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("http client")
}

async fn get(ip: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let response = http().get(format!("http://{ip}:8080{path}")).send().await?;
    Ok((response.status().as_u16(), response.text().await?))
}

fn ip_of(node: &TestNode, id: Uuid) -> String {
    node.pods
        .record(id)
        .and_then(|r| r.attachment)
        .map(|a| a.ip)
        .expect("the pod has an address")
}

async fn ensure(node: &TestNode, spec: &PodSpec) -> Outcome {
    node.pods
        .handle(&NodeJob::EnsureRunning { spec: spec.clone() })
        .await
        .expect("ensure_running")
}

/// Waits for a report of `state` for `id` and returns it (collecting everything seen).
async fn wait_report(node: &mut TestNode, seen: &mut Vec<PodReport>, id: Uuid, state: NodePodState) -> PodReport {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        seen.extend(node.drain_reports());
        if let Some(found) = seen.iter().find(|r| r.pod_id == id && r.state == state) {
            return found.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {state:?} report for {id}; saw {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn containers_of(node: &TestNode, id: Uuid) -> usize {
    node.pods
        .runtime()
        .containers()
        .await
        .expect("list containers")
        .iter()
        .filter(|c| c.id == id.to_string())
        .count()
}

async fn nothing_left(node: &TestNode, id: Uuid) {
    assert_eq!(containers_of(node, id).await, 0, "container left behind");
    assert!(
        !node
            .pods
            .runtime()
            .snapshot_exists(&id.to_string())
            .await
            .expect("stat"),
        "snapshot left behind"
    );
    assert!(
        !instapod_node_agent::network::netns_path(id).exists(),
        "netns left behind"
    );
    assert!(!node.dirs.volume(id).exists(), "volume left behind");
}

#[tokio::test]
async fn a_pod_serves_http_keeps_its_volume_across_stop_and_start_and_is_removed_on_delete() {
    let mut node = TestNode::start("lifecycle").await;
    let image = web_image().await;
    let mut spec = pod_spec(&image, 1);
    let id = spec.pod_id;
    assert_eq!(ensure(&node, &spec).await, Outcome::Applied);
    let mut seen = Vec::new();
    let running = wait_report(&mut node, &mut seen, id, NodePodState::Running).await;
    let ip = ip_of(&node, id);
    assert_eq!(
        running.ip.as_deref(),
        Some(ip.as_str()),
        "the running report carries the IP"
    );
    assert!(ip.starts_with(&node.settings.subnet_prefix), "{ip}");
    std::fs::write(node.dirs.volume(id).join("hello.txt"), "kept across restarts").expect("write into the volume");
    let (status, body) = eventually(WAIT, "the pod's HTTP server", || get(&ip, "/hello.txt")).await;
    assert_eq!((status, body.as_str()), (200, "kept across restarts"));

    node.pods
        .handle(&NodeJob::Stop {
            pod_id: id,
            generation: 2,
            grace_secs: 2,
        })
        .await
        .expect("stop");
    assert_eq!(node.pods.record(id).expect("record").state, NodePodState::Stopped);
    assert_eq!(
        node.pods.runtime().task_state(&id.to_string()).await.expect("task"),
        None
    );
    assert!(get(&ip, "/hello.txt").await.is_err(), "a stopped pod must not answer");

    spec.generation = 3;
    ensure(&node, &spec).await;
    assert_eq!(node.pods.record(id).expect("record").state, NodePodState::Running);
    let ip = ip_of(&node, id);
    let (status, body) = eventually(WAIT, "the restarted pod", || get(&ip, "/hello.txt")).await;
    assert_eq!((status, body.as_str()), (200, "kept across restarts"));
    assert_eq!(containers_of(&node, id).await, 1);

    node.pods
        .handle(&NodeJob::Delete {
            pod_id: id,
            generation: 4,
            retain_volume: false,
        })
        .await
        .expect("delete");
    wait_report(&mut node, &mut seen, id, NodePodState::Deleted).await;
    nothing_left(&node, id).await;
    assert!(!node.dirs.log(id).exists(), "the log goes with the pod");

    // A late job older than the delete must not bring the pod back.
    spec.generation = 3;
    assert_eq!(ensure(&node, &spec).await, Outcome::Stale);
    assert_eq!(containers_of(&node, id).await, 0);
}

#[tokio::test]
async fn a_job_delivered_twice_makes_one_container_and_a_second_pod_reuses_the_image() {
    let mut node = TestNode::start("twice").await;
    let image = web_image().await;
    let spec = pod_spec(&image, 1);
    // The second delivery arrives while the first is being applied: acknowledged at once.
    let (a, b) = tokio::join!(ensure(&node, &spec), ensure(&node, &spec));
    assert_eq!((a, b), (Outcome::Applied, Outcome::Duplicate));
    assert_eq!(containers_of(&node, spec.pod_id).await, 1);
    // Once the first is done, the same job is applied again (and changes nothing).
    assert_eq!(ensure(&node, &spec).await, Outcome::Applied);
    assert_eq!(containers_of(&node, spec.pod_id).await, 1);
    assert_eq!(
        node.pods
            .runtime()
            .task_state(&spec.pod_id.to_string())
            .await
            .expect("task"),
        Some(TaskState::Running)
    );
    let mut seen = Vec::new();
    wait_report(&mut node, &mut seen, spec.pod_id, NodePodState::Running).await;
    let pulls = node
        .pods
        .images()
        .stats
        .pulls
        .load(std::sync::atomic::Ordering::Relaxed);
    let bytes = node
        .pods
        .images()
        .stats
        .bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(pulls, 1, "the first pod pulls the image once");
    assert!(bytes > 100_000, "the layer came from the registry ({bytes} bytes)");

    let second = pod_spec(&image, 1);
    ensure(&node, &second).await;
    wait_report(&mut node, &mut seen, second.pod_id, NodePodState::Running).await;
    let stats = &node.pods.images().stats;
    assert_eq!(
        stats.pulls.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "no second pull"
    );
    assert_eq!(
        stats.bytes.load(std::sync::atomic::Ordering::Relaxed),
        bytes,
        "no bytes fetched again"
    );
    assert!(stats.reused.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    for id in [spec.pod_id, second.pod_id] {
        node.pods
            .handle(&NodeJob::Delete {
                pod_id: id,
                generation: 9,
                retain_volume: false,
            })
            .await
            .expect("delete");
        nothing_left(&node, id).await;
    }
}

/// Four images that share their layer (same busybox tar, different configs), pulled at the
/// same time: each pull writes the shared blob through its own ingest, so none of them fails
/// on another's partial write (containerd answered `OutOfRange` when two writes shared one).
#[tokio::test]
async fn images_sharing_a_layer_are_pulled_at_the_same_time() {
    let mut node = TestNode::start("shared-layer").await;
    let registry = instapod_tests::registry::shared();
    let mut specs = Vec::new();
    for round in 0..4 {
        let repository = format!("test/shared-{}-{round}", &instapod_tests::ids::random_suffix()[..8]);
        ImageBuilder::busybox()
            .entrypoint(["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/data"])
            .env("ROUND", &round.to_string())
            .build()
            .push(&registry.base_url(), &repository, "1")
            .await
            .expect("push");
        specs.push(pod_spec(&format!("{}/{repository}:1", registry.host()), 1));
    }
    let outcomes = futures_util::future::join_all(specs.iter().map(|spec| ensure(&node, spec))).await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Applied), "{outcomes:?}");
    let mut seen = Vec::new();
    for spec in &specs {
        wait_report(&mut node, &mut seen, spec.pod_id, NodePodState::Running).await;
    }
    let pulls = node
        .pods
        .images()
        .stats
        .pulls
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(pulls, 4, "one pull per image");
    for spec in &specs {
        node.pods
            .handle(&NodeJob::Delete {
                pod_id: spec.pod_id,
                generation: 9,
                retain_volume: false,
            })
            .await
            .expect("delete");
    }
}

#[tokio::test]
async fn a_process_past_the_memory_limit_is_oom_killed_and_reported() {
    let mut node = TestNode::start("oom").await;
    let image = web_image().await;
    let mut spec = pod_spec(&image, 1);
    spec.resources.memory_bytes = 16 << 20;
    spec.entrypoint = Some(vec!["/bin/busybox".into(), "sh".into(), "-c".into()]);
    spec.command = Some(vec![
        "echo allocating; /bin/busybox dd if=/dev/zero of=/dev/null bs=64M count=1".into(),
    ]);
    spec.restart_policy = RestartPolicy::Never;
    ensure(&node, &spec).await;
    let mut seen = Vec::new();
    let failed = wait_report(&mut node, &mut seen, spec.pod_id, NodePodState::Failed).await;
    let reason = failed.reason.clone().unwrap_or_default();
    assert!(reason.contains("out of memory"), "{failed:?}");
    assert!(reason.contains("16 MiB"), "{failed:?}");
    assert_eq!(failed.exit_code, Some(137), "{failed:?}");
    let log = std::fs::read_to_string(node.dirs.log(spec.pod_id)).expect("the pod's log");
    assert!(log.contains("allocating"), "{log}");
}

#[tokio::test]
async fn pods_cannot_reach_each_other_but_reach_the_gateway_and_themselves() {
    let mut node = TestNode::start("isolation").await;
    let image = web_image().await;
    let target = pod_spec(&image, 1);
    ensure(&node, &target).await;
    let target_ip = ip_of(&node, target.pod_id);
    eventually(WAIT, "the target pod", || get(&target_ip, "/")).await;

    // The host listens on the bridge's gateway address: the way out of the node.
    let gateway = node.settings.gateway();
    let listener = tokio::net::TcpListener::bind((gateway.as_str(), 0))
        .await
        .expect("bind the gateway address");
    let gateway_port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = socket
                .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\ngateway")
                .await;
        }
    });

    let mut probe = pod_spec(&image, 1);
    probe.entrypoint = Some(vec!["/bin/busybox".into(), "sh".into(), "-c".into()]);
    // busybox's static wget crashes here; nc speaks plain HTTP/1.0 just as well.
    probe.command = Some(vec![format!(
        "/bin/busybox httpd -p 8080 -h /data; \
         fetch() {{ printf 'GET %s HTTP/1.0\\r\\n\\r\\n' \"$3\" | /bin/busybox nc -w 2 \"$1\" \"$2\"; }}; \
         for i in 1 2 3; do \
           if fetch {target_ip} 8080 / | /bin/busybox grep -q '200 OK'; then echo reached >> /data/other; else echo blocked >> /data/other; fi; \
           fetch {gateway} {gateway_port} / >> /data/gateway 2>&1; echo >> /data/gateway; \
           fetch 127.0.0.1 8080 /self.txt >> /data/self 2>&1; echo >> /data/self; \
         done; echo done > /data/finished; sleep 3600"
    )]);
    ensure(&node, &probe).await;
    std::fs::write(node.dirs.volume(probe.pod_id).join("self.txt"), "me").expect("write");
    let volume = node.dirs.volume(probe.pod_id);
    eventually(Duration::from_secs(60), "the probe to finish", || {
        let done = volume.join("finished");
        async move {
            anyhow::ensure!(done.exists(), "not yet");
            Ok(())
        }
    })
    .await;
    let read = |name: &str| std::fs::read_to_string(volume.join(name)).unwrap_or_default();
    assert_eq!(
        read("other").lines().collect::<Vec<_>>(),
        vec!["blocked"; 3],
        "pod-to-pod traffic must be blocked"
    );
    assert!(
        read("gateway").contains("gateway"),
        "the gateway must be reachable: {:?}",
        read("gateway")
    );
    assert!(
        read("self").contains("me"),
        "a pod reaches its own services: {:?}",
        read("self")
    );
    // Outbound NAT is one node-wide rule, not a chain per pod.
    let nat = std::process::Command::new("iptables")
        .args(["-w", "5", "-t", "nat", "-S", "POSTROUTING"])
        .output()
        .expect("iptables");
    let nat = String::from_utf8_lossy(&nat.stdout);
    let bridge = &node.settings.bridge;
    let subnet = node.settings.subnet();
    let ours: Vec<&str> = nat.lines().filter(|l| l.contains(bridge.as_str())).collect();
    assert_eq!(ours.len(), 1, "one masquerade rule for the node: {ours:?}");
    assert!(
        ours[0].contains(&format!("-s {subnet}"))
            && ours[0].contains(&format!("! -d {subnet}"))
            && ours[0].ends_with("-j MASQUERADE"),
        "{}",
        ours[0]
    );
    let _ = node.drain_reports();
}

#[tokio::test]
async fn bad_specs_fail_with_a_reason_and_leave_nothing_behind() {
    let mut node = TestNode::start("bad").await;
    let image = web_image().await;
    let registry = instapod_tests::registry::shared();
    let mut seen = Vec::new();

    let missing = pod_spec(&format!("{}/test/does-not-exist:1", registry.host()), 1);
    ensure(&node, &missing).await;
    let failed = wait_report(&mut node, &mut seen, missing.pod_id, NodePodState::Failed).await;
    let reason = failed.reason.unwrap_or_default();
    assert!(reason.contains("image not found") && reason.contains("404"), "{reason}");
    nothing_left(&node, missing.pod_id).await;

    let mut bad_command = pod_spec(&image, 1);
    bad_command.entrypoint = Some(vec!["/no/such/program".into()]);
    ensure(&node, &bad_command).await;
    let failed = wait_report(&mut node, &mut seen, bad_command.pod_id, NodePodState::Failed).await;
    let reason = failed.reason.unwrap_or_default();
    assert!(reason.contains("/no/such/program"), "{reason}");
    nothing_left(&node, bad_command.pod_id).await;

    let mut absurd = pod_spec(&image, 1);
    absurd.resources = Resources {
        cpu_millis: 1,
        memory_bytes: 1 << 60,
        disk_bytes: 1,
        pids: 1,
    };
    ensure(&node, &absurd).await;
    let failed = wait_report(&mut node, &mut seen, absurd.pod_id, NodePodState::Failed).await;
    let reason = failed.reason.unwrap_or_default();
    assert!(
        reason.contains("resources out of range") && reason.contains("memory_bytes"),
        "{reason}"
    );
    nothing_left(&node, absurd.pod_id).await;

    let invalid = pod_spec("UPPER/case::bad", 1);
    ensure(&node, &invalid).await;
    let failed = wait_report(&mut node, &mut seen, invalid.pod_id, NodePodState::Failed).await;
    assert!(failed.reason.unwrap_or_default().contains("invalid image reference"));
    nothing_left(&node, invalid.pod_id).await;
}

#[tokio::test]
async fn an_image_tarball_is_imported_and_runs_without_a_registry() {
    let mut node = TestNode::start("import").await;
    let name = format!("airgap.local/static-{}:1", &instapod_tests::ids::random_suffix()[..6]);
    let tarball = process::temp_dir("import").join("image.tar");
    ImageBuilder::busybox()
        .entrypoint(["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"])
        .file("/www/index.html", "imported", 0o644)
        .build()
        .write_oci_layout(&tarball, &name)
        .expect("layout");
    let info = node
        .pods
        .images()
        .import_archive(&tarball, &name)
        .await
        .expect("import");
    assert_eq!(info.name, name);
    let spec = pod_spec(&name, 1);
    ensure(&node, &spec).await;
    let mut seen = Vec::new();
    wait_report(&mut node, &mut seen, spec.pod_id, NodePodState::Running).await;
    let ip = ip_of(&node, spec.pod_id);
    let (status, body) = eventually(WAIT, "the imported image's server", || get(&ip, "/")).await;
    assert_eq!((status, body.as_str()), (200, "imported"));
    assert_eq!(
        node.pods
            .images()
            .stats
            .pulls
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // A hostile path in an archive is refused without touching the filesystem outside.
    let bad = process::temp_dir("import-bad").join("bad.tar");
    std::fs::write(&bad, b"not a tar archive at all").expect("write");
    let err = node
        .pods
        .images()
        .import_archive(&bad, "airgap.local/bad:1")
        .await
        .expect_err("garbage");
    assert!(err.to_string().contains("importing"), "{err}");
}

#[tokio::test]
async fn restart_policy_always_restarts_after_exits_and_logs_survive_restarts() {
    let mut node = TestNode::start("restart").await;
    let image = web_image().await;
    let mut spec = pod_spec(&image, 1);
    spec.entrypoint = Some(vec!["/bin/busybox".into(), "sh".into(), "-c".into()]);
    spec.command = Some(vec!["echo run-$(/bin/busybox date +%s%N); exit 3".into()]);
    spec.restart_policy = RestartPolicy::Always;
    ensure(&node, &spec).await;
    let log = node.dirs.log(spec.pod_id);
    let runs = eventually(Duration::from_secs(20), "three runs in the log", || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            // One record per line: `<timestamp> stdout F run-…` (the agent's log driver).
            let runs = text.lines().filter(|l| l.contains(" stdout F run-")).count();
            anyhow::ensure!(runs >= 3, "{runs} runs so far");
            Ok(runs)
        }
    })
    .await;
    assert!(runs >= 3);
    let mut seen = Vec::new();
    let exited = wait_report(&mut node, &mut seen, spec.pod_id, NodePodState::Exited).await;
    assert_eq!(exited.exit_code, Some(3));
    assert_eq!(exited.reason.as_deref(), Some("exit code 3"));
    assert_eq!(
        containers_of(&node, spec.pod_id).await,
        1,
        "restarts reuse the one container"
    );

    let mut once = pod_spec(&image, 1);
    once.entrypoint = spec.entrypoint.clone();
    once.command = Some(vec!["exit 0".into()]);
    once.restart_policy = RestartPolicy::OnFailure;
    ensure(&node, &once).await;
    let exited = wait_report(&mut node, &mut seen, once.pod_id, NodePodState::Exited).await;
    assert_eq!(exited.exit_code, Some(0));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        node.pods.record(once.pod_id).expect("record").state,
        NodePodState::Exited,
        "a clean exit under on-failure is not restarted"
    );
}

#[tokio::test]
async fn resize_changes_the_running_tasks_cgroup_limits() {
    let mut node = TestNode::start("resize").await;
    let image = web_image().await;
    let spec = pod_spec(&image, 1);
    ensure(&node, &spec).await;
    let mut seen = Vec::new();
    wait_report(&mut node, &mut seen, spec.pod_id, NodePodState::Running).await;
    let cgroup = Path::new("/sys/fs/cgroup/memory/instapod-test").join(spec.pod_id.to_string());
    let limit = || {
        std::fs::read_to_string(cgroup.join("memory.limit_in_bytes"))
            .expect("the pod's memory cgroup")
            .trim()
            .parse::<u64>()
            .expect("a number")
    };
    assert_eq!(limit(), 64 << 20);
    let bigger = Resources {
        memory_bytes: 128 << 20,
        ..spec.resources
    };
    node.pods
        .handle(&NodeJob::Resize {
            pod_id: spec.pod_id,
            generation: 2,
            resources: bigger,
        })
        .await
        .expect("resize");
    assert_eq!(limit(), 128 << 20, "the running task got the new limit");
    assert_eq!(
        node.pods
            .runtime()
            .task_state(&spec.pod_id.to_string())
            .await
            .expect("task"),
        Some(TaskState::Running),
        "resizing does not restart"
    );
    let quota = std::fs::read_to_string(
        Path::new("/sys/fs/cgroup/cpu/instapod-test")
            .join(spec.pod_id.to_string())
            .join("cpu.cfs_quota_us"),
    )
    .expect("cpu cgroup");
    assert_eq!(quota.trim(), "25000", "250 millicores = 25 ms per 100 ms");
}

#[tokio::test]
async fn a_killed_task_is_restarted_and_reconcile_removes_containers_of_no_pod() {
    let mut node = TestNode::start("reconcile").await;
    let image = web_image().await;
    let mut kept = pod_spec(&image, 1);
    kept.restart_policy = RestartPolicy::Always;
    let orphan = pod_spec(&image, 1);
    ensure(&node, &kept).await;
    ensure(&node, &orphan).await;
    let mut seen = Vec::new();
    wait_report(&mut node, &mut seen, orphan.pod_id, NodePodState::Running).await;

    // The kept pod's task dies behind the agent's back; the orphan's record disappears (as if
    // the pod had been deleted while its container lingered).
    let runtime = node.pods.runtime().clone();
    runtime.kill_task(&kept.pod_id.to_string(), 9).await.expect("kill");
    let exited = wait_report(&mut node, &mut seen, kept.pod_id, NodePodState::Exited).await;
    assert_eq!(exited.exit_code, Some(137), "{exited:?}");
    std::fs::remove_file(node.dirs.record(orphan.pod_id)).expect("remove the orphan's record");
    node.pods.load_records().expect("reload records");

    node.pods.reconcile().await.expect("reconcile");
    assert_eq!(
        containers_of(&node, orphan.pod_id).await,
        0,
        "the orphan's container is removed"
    );
    assert!(!instapod_node_agent::network::netns_path(orphan.pod_id).exists());
    eventually(WAIT, "the kept pod to run again", || {
        let runtime = runtime.clone();
        let id = kept.pod_id.to_string();
        async move {
            let state = runtime.task_state(&id).await?;
            anyhow::ensure!(state == Some(TaskState::Running), "{state:?}");
            Ok(())
        }
    })
    .await;
    assert_eq!(containers_of(&node, kept.pod_id).await, 1);
}

#[tokio::test]
async fn a_private_registry_is_pulled_from_with_credentials_and_refused_without() {
    let mut node = TestNode::start("auth").await;
    let image = web_image().await;
    let open = instapod_tests::registry::shared();
    let private = instapod_tests::Registry::start_authenticated(open, "puller", "s3cret-pass");
    // The same image, served by the registry that wants credentials.
    let private_image = image.replacen(&open.host(), &private.host(), 1);
    let mut seen = Vec::new();

    let anonymous = pod_spec(&private_image, 1);
    ensure(&node, &anonymous).await;
    let failed = wait_report(&mut node, &mut seen, anonymous.pod_id, NodePodState::Failed).await;
    let reason = failed.reason.unwrap_or_default();
    assert!(reason.contains("401"), "{reason}");
    nothing_left(&node, anonymous.pod_id).await;

    let mut wrong = pod_spec(&private_image, 1);
    wrong.registry_auth = Some(instapod_common::node::RegistryAuth {
        username: "puller".into(),
        password: "wrong".into(),
    });
    ensure(&node, &wrong).await;
    let failed = wait_report(&mut node, &mut seen, wrong.pod_id, NodePodState::Failed).await;
    let reason = failed.reason.unwrap_or_default();
    assert!(
        reason.contains("refused") && !reason.contains("wrong"),
        "no password in reasons: {reason}"
    );

    let mut right = pod_spec(&private_image, 1);
    right.registry_auth = Some(instapod_common::node::RegistryAuth {
        username: "puller".into(),
        password: "s3cret-pass".into(),
    });
    ensure(&node, &right).await;
    wait_report(&mut node, &mut seen, right.pod_id, NodePodState::Running).await;
    assert_eq!(
        node.pods
            .images()
            .stats
            .pulls
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn stop_kills_a_process_that_ignores_sigterm_after_the_grace_period_and_delete_can_keep_the_volume() {
    let mut node = TestNode::start("grace").await;
    let image = web_image().await;
    let mut spec = pod_spec(&image, 1);
    spec.entrypoint = Some(vec!["/bin/busybox".into(), "sh".into(), "-c".into()]);
    spec.command = Some(vec![
        "trap '' TERM; echo ignoring; while true; do /bin/busybox sleep 1; done".into(),
    ]);
    ensure(&node, &spec).await;
    let log = node.dirs.log(spec.pod_id);
    eventually(WAIT, "the trap to be set", || {
        let log = log.clone();
        async move {
            anyhow::ensure!(
                std::fs::read_to_string(&log).unwrap_or_default().contains("ignoring"),
                "not yet"
            );
            Ok(())
        }
    })
    .await;
    std::fs::write(node.dirs.volume(spec.pod_id).join("keep.txt"), "data").expect("write");
    let started = std::time::Instant::now();
    node.pods
        .handle(&NodeJob::Stop {
            pod_id: spec.pod_id,
            generation: 2,
            grace_secs: 1,
        })
        .await
        .expect("stop");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "SIGKILL must wait for the grace period ({took:?})"
    );
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    assert_eq!(
        node.pods
            .runtime()
            .task_state(&spec.pod_id.to_string())
            .await
            .expect("task"),
        None
    );
    let mut seen = Vec::new();
    wait_report(&mut node, &mut seen, spec.pod_id, NodePodState::Stopped).await;

    node.pods
        .handle(&NodeJob::Delete {
            pod_id: spec.pod_id,
            generation: 3,
            retain_volume: true,
        })
        .await
        .expect("delete");
    assert_eq!(containers_of(&node, spec.pod_id).await, 0);
    assert_eq!(
        std::fs::read_to_string(node.dirs.volume(spec.pod_id).join("keep.txt")).expect("the retained volume"),
        "data"
    );
}

#[tokio::test]
async fn the_local_stacks_static_image_serves_the_public_folder_of_the_volume() {
    let mut node = TestNode::start("static").await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-static-image");
    let tarball = process::temp_dir("static-image").join("static.tar");
    let name = format!("local.test/static-{}:1", &instapod_tests::ids::random_suffix()[..6]);
    let output = std::process::Command::new("python3")
        .arg(&script)
        .arg("--oci-layout")
        .arg(&tarball)
        .args(["--name", &name])
        .output()
        .expect("run scripts/build-static-image");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    node.pods
        .images()
        .import_archive(&tarball, &name)
        .await
        .expect("import");
    // As the catalog's `static` runtime runs it: its command replaces the image's cmd.
    let mut spec = pod_spec(&name, 1);
    spec.command = Some(
        ["httpd", "-f", "-p", "8080", "-h", "/data/public"]
            .map(String::from)
            .to_vec(),
    );
    ensure(&node, &spec).await;
    let mut seen = Vec::new();
    wait_report(&mut node, &mut seen, spec.pod_id, NodePodState::Running).await;
    let public = node.dirs.volume(spec.pod_id).join("public");
    eventually(WAIT, "the image to create /data/public", || {
        let public = public.clone();
        async move {
            anyhow::ensure!(public.is_dir(), "not yet");
            Ok(())
        }
    })
    .await;
    std::fs::write(public.join("index.html"), "<h1>hello</h1>").expect("write");
    let ip = ip_of(&node, spec.pod_id);
    let (status, body) = eventually(WAIT, "the static site", || get(&ip, "/")).await;
    assert_eq!((status, body.as_str()), (200, "<h1>hello</h1>"));
}
