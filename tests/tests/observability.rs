//! The shipped Prometheus and Grafana files against the code (issue 6, "Prometheus and
//! dashboards"):
//! - `promtool` accepts `deploy/prometheus/prometheus.yml` and its rule files, and the rule unit
//!   tests of `deploy/prometheus/tests/` pass (the alerts fire on synthetic series). promtool
//!   is required: without it the test fails and says how to install it.
//! - Every metric a dashboard query or an alert rule names is in the catalogue of
//!   `instapod_common::metrics` (histograms as `_bucket`, `_sum`, `_count`), and every
//!   catalogued metric is documented in `docs/metrics.md` (and nothing else is).
//! - A real fleet (control plane, scheduler, node agent) running a pod shows only catalogued
//!   metrics on its three `/metrics`, with a `# HELP` line for each, HTTP routes as templates
//!   (never a pod's name), and every catalogued metric that does not wait for a rarer event
//!   (listed in [`EVENT_ONLY`], each with the event).

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::ensure;
use instapod_common::metrics::{self, Metric};
use instapod_tests::fleet::{Fleet, FleetOptions};
use instapod_tests::images::ImageBuilder;
use instapod_tests::{eventually, ids, process, registry, scale_user};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

/// Catalogued metrics a short run with one healthy pod does not show, and the event that
/// creates them.
const EVENT_ONLY: &[(&str, &str)] = &[
    (
        "instapod_control_plane_ingress_route_refreshes_total",
        "an agent polls the route feed (first after 30 s)",
    ),
    (
        "instapod_control_plane_ingress_routes",
        "a route feed read that changed",
    ),
    (
        "instapod_control_plane_domain_reports_total",
        "a node reports about a custom domain",
    ),
    ("instapod_node_agent_containerd_errors_total", "a containerd call fails"),
    ("instapod_node_agent_log_followers", "someone follows a log"),
    (
        "instapod_node_agent_pod_restarts_total",
        "a pod's task exits and restarts",
    ),
    (
        "instapod_node_agent_ingress_requests_total",
        "a request through the ingress",
    ),
    (
        "instapod_node_agent_ingress_request_duration_seconds",
        "a request through the ingress",
    ),
    (
        "instapod_node_agent_ingress_route_feed_polls_total",
        "a route feed poll",
    ),
    ("instapod_node_agent_ingress_remote_routes", "a route feed poll"),
    (
        "instapod_node_agent_ingress_route_feed_last_success_timestamp_seconds",
        "a route feed poll",
    ),
    ("instapod_node_agent_volume_transfers_total", "a clone or a move"),
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_path_buf()
}

fn files_in(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("reading {}: {err}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .{extension} file in {}", dir.display());
    files
}

/// Every `instapod_[a-z0-9_]+` identifier in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut at = 0;
    while let Some(found) = text[at..].find("instapod_") {
        let start = at + found;
        let preceded = start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start + "instapod_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase() || bytes[end].is_ascii_digit() || bytes[end] == b'_')
        {
            end += 1;
        }
        // A prefix (`instapod_node_agent_pod_*`, `instapod_<component>`) is not a name.
        if !preceded && !text[..end].ends_with('_') {
            names.insert(text[start..end].to_string());
        }
        at = end;
    }
    names
}

fn catalogue() -> Vec<Metric> {
    metrics::ALL.iter().flat_map(|(_, list)| list.iter().copied()).collect()
}

/// Every series name the catalogue allows (histograms' three).
fn allowed_series(list: &[Metric]) -> HashSet<String> {
    list.iter().flat_map(Metric::series_names).collect()
}

fn promtool() -> PathBuf {
    process::find_in_path("promtool").unwrap_or_else(|| {
        panic!(
            "promtool is not on PATH: the alert rules and the Prometheus configuration cannot be \
             checked. Install it with scripts/install-deps (Debian package `prometheus`)"
        )
    })
}

fn run_promtool(args: &[&str], dir: &Path) {
    let output = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|err| panic!("running promtool {args:?}: {err}"));
    assert!(
        output.status.success(),
        "promtool {args:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn promtool_accepts_the_config_and_the_rules_and_the_alerts_fire_on_synthetic_series() {
    let dir = repo_root().join("deploy/prometheus");
    run_promtool(&["check", "config", "prometheus.yml"], &dir);
    for rules in files_in(&dir.join("rules"), "yml") {
        run_promtool(&["check", "rules", &rules.to_string_lossy()], &dir);
    }
    for tests in files_in(&dir.join("tests"), "yml") {
        run_promtool(&["test", "rules", &tests.to_string_lossy()], &dir);
    }
}

/// Every string of a JSON document, with its path, for the queries of a dashboard.
fn strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|item| strings(item, out)),
        Value::Object(map) => map.values().for_each(|item| strings(item, out)),
        _ => {}
    }
}

#[test]
fn dashboards_and_alert_rules_name_only_catalogued_metrics() {
    let allowed = allowed_series(&catalogue());
    let root = repo_root();
    let mut used = BTreeSet::new();
    let mut uids = HashSet::new();
    for path in files_in(&root.join("deploy/grafana/dashboards"), "json") {
        let text = std::fs::read_to_string(&path).expect("read a dashboard");
        let dashboard: Value =
            serde_json::from_str(&text).unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display()));
        assert!(
            uids.insert(dashboard["uid"].as_str().expect("a uid").to_string()),
            "{}: uid used twice",
            path.display()
        );
        let panels = dashboard["panels"].as_array().expect("panels");
        let exprs: Vec<&str> = panels
            .iter()
            .flat_map(|p| p["targets"].as_array().into_iter().flatten())
            .filter_map(|t| t["expr"].as_str())
            .collect();
        assert!(exprs.len() >= 5, "{}: only {} queries", path.display(), exprs.len());
        let mut all = Vec::new();
        strings(&dashboard, &mut all);
        let names: BTreeSet<String> = all.iter().flat_map(|s| metric_names(s)).collect();
        assert!(!names.is_empty(), "{} names no metric", path.display());
        for name in &names {
            assert!(
                allowed.contains(name),
                "{} queries {name}, which no component exports (common/src/metrics.rs)",
                path.display()
            );
        }
        used.extend(names);
    }
    let pod = std::fs::read_to_string(root.join("deploy/grafana/dashboards/pod.json")).expect("the pod dashboard");
    let pod: Value = serde_json::from_str(&pod).expect("JSON");
    assert!(
        pod["templating"]["list"]
            .as_array()
            .expect("variables")
            .iter()
            .any(|v| v["name"] == "pod_id"),
        "the pod dashboard has a pod_id variable"
    );
    for path in files_in(&root.join("deploy/prometheus/rules"), "yml") {
        let text = std::fs::read_to_string(&path).expect("read the rules");
        let names = metric_names(&text);
        assert!(!names.is_empty(), "{} names no metric", path.display());
        for name in &names {
            assert!(
                allowed.contains(name),
                "{} uses {name}, which no component exports (common/src/metrics.rs)",
                path.display()
            );
        }
        used.extend(names);
    }
    // The issue's alerts and panels really are there.
    for wanted in [
        "instapod_node_agent_pod_restarts_total",
        "instapod_control_plane_queue_depth",
        "instapod_node_agent_filesystem_avail_bytes",
        "instapod_node_agent_pod_disk_quota_bytes",
        "instapod_control_plane_http_requests_total",
        "instapod_node_agent_pod_cpu_seconds_total",
        "instapod_node_agent_pod_memory_bytes",
        "instapod_scheduler_placement_duration_seconds_bucket",
    ] {
        assert!(used.contains(wanted), "nothing shipped uses {wanted}");
    }
}

#[test]
fn docs_describe_every_catalogued_metric_and_nothing_else() {
    let docs = std::fs::read_to_string(repo_root().join("docs/metrics.md")).expect("docs/metrics.md");
    let list = catalogue();
    for metric in &list {
        assert!(
            docs.contains(&format!("`{}`", metric.name)),
            "docs/metrics.md does not describe {}",
            metric.name
        );
    }
    let mut allowed = allowed_series(&list);
    allowed.extend(list.iter().map(|m| m.name.to_string()));
    for name in metric_names(&docs) {
        assert!(
            allowed.contains(&name),
            "docs/metrics.md describes {name}, which no component exports"
        );
    }
}

/// The `instapod_` series names of a `/metrics` text (the part before `{` or a space), and
/// the names given a `# HELP` line.
fn exposition(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut series = BTreeSet::new();
    let mut helped = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap_or_default().to_string());
        } else if !line.starts_with('#') && line.starts_with("instapod_") {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            series.insert(line[..end].to_string());
        }
    }
    (series, helped)
}

/// The base name of a series (a histogram's `_bucket`, `_sum`, `_count` removed when the base
/// is a catalogued histogram).
fn base_name(series: &str, list: &[Metric]) -> String {
    for metric in list {
        if metric.series_names().iter().any(|s| s == series) {
            return metric.name.to_string();
        }
    }
    series.to_string()
}

async fn scrape(url: &str) -> String {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client");
    client
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|err| panic!("GET {url}: {err}"))
        .text()
        .await
        .expect("a /metrics body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_fleet_exports_the_catalogued_metrics_and_only_those() {
    let fleet = Fleet::start(FleetOptions::regions(["local"])).await;
    let user = scale_user(&fleet.cp).await;
    let registry = registry::shared();
    let repository = format!("test/observability-{}", &ids::random_suffix()[..8]);
    ImageBuilder::busybox()
        .build()
        .push(&registry.base_url(), &repository, "1")
        .await
        .expect("push an image");
    let name = format!("obs-{}", &ids::random_suffix()[..8]);
    user.client()
        .post_json(
            "/api/pods",
            &json!({"name": name, "image": format!("{}/{repository}:1", registry.host()),
                    "plan": "starter", "region": "local", "command": ["sh", "-c", "sleep 3600"]}),
        )
        .await
        .json_with_status(202);
    user.wait_pod_state(&name, "running", WAIT).await;
    // A 404 on an unknown path, to see the `unmatched` route.
    let _ = user.client().get("/api/no-such-thing/at-all").send().await;

    let control_plane_url = format!("{}/metrics", fleet.cp.url());
    let scheduler_url = format!("http://127.0.0.1:{}/metrics", fleet.scheduler.metrics_port);
    let agent_url = format!("http://127.0.0.1:{}/metrics", fleet.nodes[0].metrics_port);
    let event_only: HashSet<&str> = EVENT_ONLY.iter().map(|(name, _)| *name).collect();
    let components = [
        ("control plane", control_plane_url.as_str(), metrics::CONTROL_PLANE),
        ("scheduler", scheduler_url.as_str(), metrics::SCHEDULER),
        ("node agent", agent_url.as_str(), metrics::NODE_AGENT),
    ];
    // Some series come from samplers (queue depth every 15 s, pod samples): wait for them.
    let texts = eventually(WAIT, "every catalogued metric shown", || async {
        let mut texts = Vec::new();
        for (component, url, list) in components {
            let text = scrape(url).await;
            let (series, _) = exposition(&text);
            let shown: HashSet<String> = series.iter().map(|s| base_name(s, list)).collect();
            let missing: Vec<&str> = list
                .iter()
                .map(|m| m.name)
                .filter(|name| !shown.contains(*name) && !event_only.contains(name))
                .collect();
            ensure!(missing.is_empty(), "{component} does not show {missing:?}");
            texts.push(text);
        }
        Ok(texts)
    })
    .await;

    for ((component, _, list), text) in components.iter().zip(&texts) {
        let allowed = allowed_series(list);
        let (series, helped) = exposition(text);
        for name in &series {
            assert!(
                allowed.contains(name),
                "the {component} exports {name}, which is not in its catalogue (common/src/metrics.rs)"
            );
            let base = base_name(name, list);
            assert!(helped.contains(&base), "the {component} shows {base} without # HELP");
        }
    }

    let control_plane = &texts[0];
    let routes: BTreeSet<&str> = control_plane
        .lines()
        .filter(|l| l.starts_with("instapod_control_plane_http_requests_total{"))
        .filter_map(|l| l.split("route=\"").nth(1)?.split('"').next())
        .collect();
    assert!(routes.contains("/api/pods/{name}"), "routes are templates: {routes:?}");
    assert!(
        routes.contains("unmatched"),
        "unknown paths are `unmatched`: {routes:?}"
    );
    assert!(
        !routes.iter().any(|r| r.contains(&name) || r.contains("no-such-thing")),
        "a raw path became a label value: {routes:?}"
    );
    assert!(
        control_plane
            .contains(r#"instapod_control_plane_jobs_enqueued_total{queue="pods",kind="create",outcome="ok"} 1"#),
        "the create's job is counted:\n{control_plane}"
    );
    let scheduler = &texts[1];
    let placed: f64 = scheduler
        .lines()
        .filter(|l| l.starts_with("instapod_scheduler_placements_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(placed, 1.0, "one placement:\n{scheduler}");
    let agent = &texts[2];
    assert!(
        agent.contains(r#"instapod_node_agent_pods{state="running"} 1"#),
        "the agent counts its running pod:\n{agent}"
    );
    assert!(
        agent
            .lines()
            .any(|l| l.starts_with("instapod_node_agent_allocated_cpu_cores ") && !l.ends_with(" 0")),
        "the pod's CPU is allocated:\n{agent}"
    );

    user.client().delete_response(&format!("/api/pods/{name}")).await;
    eventually(WAIT, "the pod is gone", || async {
        let status = user.client().get(&format!("/api/pods/{name}")).send().await.status;
        ensure!(status == 404, "status {status}");
        Ok(())
    })
    .await;
}

#[test]
fn metric_names_are_found_in_queries() {
    let names =
        metric_names(r#"sum(rate(instapod_a_total{x="instapod-job"}[5m])) / instapod_b_bytes and not_instapod_c"#);
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["instapod_a_total", "instapod_b_bytes"]
    );
}
