//! Input rules for what nodes send: join requests, heartbeats and report batches, each turned
//! into the plain values the store writes. Every rule returns a message that states it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use instapod_common::node::{Capacity, Heartbeat, HeartbeatPod, JoinRequest, PodReport};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// The most labels a node may carry.
pub const MAX_LABELS: usize = 32;
/// The longest label key, in characters.
pub const MAX_LABEL_KEY_CHARS: usize = 63;
/// The longest label value, in characters.
pub const MAX_LABEL_VALUE_CHARS: usize = 255;
/// The longest agent version string, in characters.
pub const MAX_AGENT_VERSION_CHARS: usize = 64;
/// The most pods one heartbeat may list.
pub const MAX_HEARTBEAT_PODS: usize = 10_000;
/// The most reports one batch may carry (more is 413).
pub const MAX_REPORTS_PER_BATCH: usize = 1000;
/// Longer report reasons are cut to this many characters (and end with `…`) rather than
/// refused: a refused report would be retried forever by the agent.
pub const MAX_REASON_CHARS: usize = 2000;

/// A validated join request.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinInput {
    pub name: String,
    pub region: String,
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    pub node_id: Option<Uuid>,
    /// Where the node's ingress is reachable (`ip:port`, canonical), if it said.
    pub ingress_addr: Option<String>,
}

/// Capacity as stored (bigint columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityRow {
    pub cpu_millis: i64,
    pub memory_bytes: i64,
    pub disk_bytes: i64,
}

/// A validated heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatInput {
    pub total: CapacityRow,
    pub allocatable: CapacityRow,
    pub region: String,
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    /// The pod list as stored in `nodes.pods`.
    pub pods: serde_json::Value,
    /// As in [`JoinInput::ingress_addr`].
    pub ingress_addr: Option<String>,
}

/// A validated report.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportInput {
    pub pod_id: Uuid,
    pub generation: i64,
    pub state: &'static str,
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    pub ip: Option<String>,
    pub observed_at: OffsetDateTime,
}

/// A DNS label: 1 to 63 of `a-z`, `0-9` and `-`, not starting or ending with `-`. Uppercase
/// letters are lowered first (hostnames are case-insensitive).
fn dns_label(field: &str, raw: &str) -> Result<String, String> {
    let label = raw.to_ascii_lowercase();
    let ok = (1..=63).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-');
    if ok {
        Ok(label)
    } else {
        Err(format!(
            "{field} must be 1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-' (got {raw:?})"
        ))
    }
}

pub fn node_name(raw: &str) -> Result<String, String> {
    dns_label("name", raw)
}

pub fn region(raw: &str) -> Result<String, String> {
    dns_label("region", raw)
}

/// At most [`MAX_LABELS`] labels; keys are 1 to 63 of `A-Z a-z 0-9 - _ . /`, values at most
/// 255 characters without control characters.
pub fn labels(labels: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels (got {})", labels.len()));
    }
    for (key, value) in labels {
        let key_ok = (1..=MAX_LABEL_KEY_CHARS).contains(&key.len())
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        if !key_ok {
            return Err(format!(
                "label key {key:?} must be 1 to {MAX_LABEL_KEY_CHARS} characters of A-Z, a-z, 0-9, '-', '_', '.' and '/'"
            ));
        }
        if value.chars().count() > MAX_LABEL_VALUE_CHARS || value.chars().any(char::is_control) {
            return Err(format!(
                "label {key:?}: value must be at most {MAX_LABEL_VALUE_CHARS} characters without control characters"
            ));
        }
    }
    Ok(labels.clone())
}

pub fn agent_version(raw: &str) -> Result<String, String> {
    let n_chars = raw.chars().count();
    if n_chars == 0 || n_chars > MAX_AGENT_VERSION_CHARS || raw.chars().any(char::is_control) {
        return Err(format!(
            "agent_version must be 1 to {MAX_AGENT_VERSION_CHARS} characters without control characters"
        ));
    }
    Ok(raw.to_string())
}

pub fn join(request: &JoinRequest) -> Result<JoinInput, String> {
    Ok(JoinInput {
        name: node_name(&request.name)?,
        region: region(&request.region)?,
        labels: labels(&request.labels)?,
        agent_version: agent_version(&request.agent_version)?,
        node_id: request.node_id,
        ingress_addr: request.ingress_addr.as_deref().map(ingress_addr).transpose()?,
    })
}

/// An ingress address other nodes can connect to: `ip:port` with a specific address (not
/// `0.0.0.0` or `::`) and a port other than 0; stored in canonical form.
pub fn ingress_addr(raw: &str) -> Result<String, String> {
    let addr: SocketAddr = raw
        .parse()
        .map_err(|_| format!("ingress_addr must be ip:port, such as 10.0.0.5:80 (got {raw:?})"))?;
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(format!(
            "ingress_addr must name a reachable address and port, not {addr} (set the agent's ingress_advertise)"
        ));
    }
    Ok(addr.to_string())
}

fn capacity(field: &str, capacity: &Capacity) -> Result<CapacityRow, String> {
    let convert = |dimension: &str, value: u64| {
        i64::try_from(value).map_err(|_| format!("{field}.{dimension} is too large ({value})"))
    };
    Ok(CapacityRow {
        cpu_millis: convert("cpu_millis", capacity.cpu_millis)?,
        memory_bytes: convert("memory_bytes", capacity.memory_bytes)?,
        disk_bytes: convert("disk_bytes", capacity.disk_bytes)?,
    })
}

/// An IP address, in its canonical text form.
fn ip(field: &str, raw: &str) -> Result<String, String> {
    raw.parse::<IpAddr>()
        .map(|ip| ip.to_string())
        .map_err(|_| format!("{field} must be an IP address without a prefix length (got {raw:?})"))
}

fn generation(field: &str, generation: i64) -> Result<i64, String> {
    if generation < 0 {
        return Err(format!("{field} must not be negative (got {generation})"));
    }
    Ok(generation)
}

/// Allocatable capacity must fit in the total: it is the total minus the node's reservations.
pub fn heartbeat(heartbeat: &Heartbeat) -> Result<HeartbeatInput, String> {
    let total = capacity("total", &heartbeat.total)?;
    let allocatable = capacity("allocatable", &heartbeat.allocatable)?;
    for (dimension, allocatable, total) in [
        ("cpu_millis", allocatable.cpu_millis, total.cpu_millis),
        ("memory_bytes", allocatable.memory_bytes, total.memory_bytes),
        ("disk_bytes", allocatable.disk_bytes, total.disk_bytes),
    ] {
        if allocatable > total {
            return Err(format!(
                "allocatable.{dimension} ({allocatable}) exceeds total.{dimension} ({total})"
            ));
        }
    }
    if heartbeat.pods.len() > MAX_HEARTBEAT_PODS {
        return Err(format!(
            "a heartbeat lists at most {MAX_HEARTBEAT_PODS} pods (got {})",
            heartbeat.pods.len()
        ));
    }
    let mut pods = Vec::with_capacity(heartbeat.pods.len());
    for (index, pod) in heartbeat.pods.iter().enumerate() {
        pods.push(HeartbeatPod {
            pod_id: pod.pod_id,
            generation: generation(&format!("pods[{index}].generation"), pod.generation)?,
            state: pod.state,
            ip: pod
                .ip
                .as_deref()
                .map(|raw| ip(&format!("pods[{index}].ip"), raw))
                .transpose()?,
        });
    }
    let pods = serde_json::to_value(&pods).map_err(|err| format!("pods cannot be stored: {err}"))?;
    Ok(HeartbeatInput {
        total,
        allocatable,
        region: region(&heartbeat.region)?,
        labels: labels(&heartbeat.labels)?,
        agent_version: agent_version(&heartbeat.agent_version)?,
        pods,
        ingress_addr: heartbeat.ingress_addr.as_deref().map(ingress_addr).transpose()?,
    })
}

/// `text` cut to `max_chars` characters, the last of which becomes `…` when it was longer.
fn truncate_chars(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars.saturating_sub(1)) {
        Some((cut, _)) if text.chars().count() > max_chars => format!("{}…", &text[..cut]),
        _ => text.to_string(),
    }
}

pub fn report(index: usize, report: &PodReport) -> Result<ReportInput, String> {
    let observed_at = OffsetDateTime::parse(&report.at, &Rfc3339).map_err(|err| {
        format!(
            "reports[{index}].at must be an RFC 3339 time (got {:?}: {err})",
            report.at
        )
    })?;
    Ok(ReportInput {
        pod_id: report.pod_id,
        generation: generation(&format!("reports[{index}].generation"), report.generation)?,
        state: report.state.as_str(),
        reason: report
            .reason
            .as_deref()
            .map(|reason| truncate_chars(reason, MAX_REASON_CHARS)),
        exit_code: report.exit_code,
        ip: report
            .ip
            .as_deref()
            .map(|raw| ip(&format!("reports[{index}].ip"), raw))
            .transpose()?,
        observed_at,
    })
}

#[cfg(test)]
mod tests {
    use instapod_common::node::NodePodState;

    use super::*;

    fn check<T: std::fmt::Debug>(outcome: Result<T, String>, expected_error: Option<&str>) {
        match (outcome, expected_error) {
            (Ok(_), None) => {}
            (Err(message), Some(expected)) => assert!(message.contains(expected), "{message:?} lacks {expected:?}"),
            (outcome, expected) => panic!("expected {expected:?}, got {outcome:?}"),
        }
    }

    #[test]
    fn names_and_regions_are_dns_labels() {
        assert_eq!(node_name("Node-1"), Ok("node-1".to_string()));
        check(node_name("a"), None);
        check(node_name(&"a".repeat(63)), None);
        check(node_name(&"a".repeat(64)), Some("1 to 63"));
        check(node_name(""), Some("1 to 63"));
        check(node_name("-node"), Some("not starting"));
        check(node_name("node.example.com"), Some("a-z"));
        check(node_name("nöde"), Some("a-z"));
        check(region(""), Some("region"));
        check(region("eu-central"), None);
    }

    #[test]
    fn labels_are_bounded() {
        let ok = BTreeMap::from([
            ("disk".to_string(), "ssd".to_string()),
            ("a/b.c_d-e".to_string(), String::new()),
        ]);
        check(labels(&ok), None);
        let many: BTreeMap<String, String> = (0..=MAX_LABELS).map(|i| (format!("k{i}"), "v".to_string())).collect();
        check(labels(&many), Some("at most 32 labels"));
        check(
            labels(&BTreeMap::from([(String::new(), "v".to_string())])),
            Some("label key"),
        );
        check(
            labels(&BTreeMap::from([("k".repeat(64), "v".to_string())])),
            Some("label key"),
        );
        check(
            labels(&BTreeMap::from([("k k".to_string(), "v".to_string())])),
            Some("label key"),
        );
        check(
            labels(&BTreeMap::from([("k".to_string(), "v".repeat(256))])),
            Some("at most 255"),
        );
        check(
            labels(&BTreeMap::from([("k".to_string(), "a\nb".to_string())])),
            Some("control"),
        );
    }

    fn sample_heartbeat() -> Heartbeat {
        let capacity = Capacity {
            cpu_millis: 4000,
            memory_bytes: 8 << 30,
            disk_bytes: 100 << 30,
        };
        Heartbeat {
            total: capacity,
            allocatable: capacity,
            region: "local".to_string(),
            labels: BTreeMap::new(),
            agent_version: "0.1.0".to_string(),
            pods: vec![HeartbeatPod {
                pod_id: Uuid::nil(),
                generation: 1,
                state: NodePodState::Running,
                ip: Some("10.88.0.2".to_string()),
            }],
            ingress_addr: Some("10.0.0.5:80".to_string()),
            peer_addr: None,
            ssh_addr: None,
        }
    }

    #[test]
    fn heartbeats() {
        let input = heartbeat(&sample_heartbeat()).expect("valid");
        assert_eq!(input.total.cpu_millis, 4000);
        assert_eq!(input.pods[0]["state"], "running");
        assert_eq!(input.pods[0]["ip"], "10.88.0.2");

        let mut too_much = sample_heartbeat();
        too_much.allocatable.memory_bytes += 1;
        check(heartbeat(&too_much), Some("allocatable.memory_bytes"));
        let mut huge = sample_heartbeat();
        huge.total.disk_bytes = u64::MAX;
        check(heartbeat(&huge), Some("total.disk_bytes is too large"));
        let mut cidr = sample_heartbeat();
        cidr.pods[0].ip = Some("10.88.0.2/16".to_string());
        check(heartbeat(&cidr), Some("pods[0].ip"));
        let mut negative = sample_heartbeat();
        negative.pods[0].generation = -1;
        check(heartbeat(&negative), Some("pods[0].generation"));
        let mut no_version = sample_heartbeat();
        no_version.agent_version = String::new();
        check(heartbeat(&no_version), Some("agent_version"));
        assert_eq!(input.ingress_addr.as_deref(), Some("10.0.0.5:80"));
    }

    #[test]
    fn ingress_addresses() {
        assert_eq!(ingress_addr("127.0.0.1:8088"), Ok("127.0.0.1:8088".to_string()));
        assert_eq!(ingress_addr("[::1]:80"), Ok("[::1]:80".to_string()));
        check(ingress_addr("0.0.0.0:80"), Some("reachable"));
        check(ingress_addr("[::]:80"), Some("reachable"));
        check(ingress_addr("10.0.0.5:0"), Some("reachable"));
        check(ingress_addr("node-1:80"), Some("ip:port"));
        check(ingress_addr("10.0.0.5"), Some("ip:port"));
    }

    #[test]
    fn reports() {
        let sample = PodReport {
            pod_id: Uuid::nil(),
            generation: 2,
            state: NodePodState::Failed,
            reason: Some("x".repeat(MAX_REASON_CHARS + 10)),
            exit_code: Some(137),
            ip: Some("fd00::2".to_string()),
            at: "2025-01-02T03:04:05.123Z".to_string(),
        };
        let input = report(0, &sample).expect("valid");
        assert_eq!(input.state, "failed");
        let reason = input.reason.expect("kept");
        assert_eq!(reason.chars().count(), MAX_REASON_CHARS);
        assert!(reason.ends_with('…'));
        assert_eq!(input.observed_at.unix_timestamp(), 1_735_787_045);

        check(
            report(
                3,
                &PodReport {
                    at: "yesterday".to_string(),
                    ..sample.clone()
                },
            ),
            Some("reports[3].at"),
        );
        check(
            report(
                0,
                &PodReport {
                    ip: Some("nope".to_string()),
                    ..sample.clone()
                },
            ),
            Some("reports[0].ip"),
        );
        check(
            report(
                0,
                &PodReport {
                    generation: -5,
                    ..sample
                },
            ),
            Some("generation"),
        );
    }

    #[test]
    fn truncation_keeps_short_text() {
        assert_eq!(truncate_chars("short", 10), "short");
        assert_eq!(truncate_chars("exactly10!", 10), "exactly10!");
        assert_eq!(truncate_chars("élévation", 4), "élé…");
    }
}
