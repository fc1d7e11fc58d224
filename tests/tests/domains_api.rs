//! Custom domains on a real control plane (Postgres, Redis), with the node side driven through
//! the internal API by a joined node's token: host name validation and normalisation (400),
//! one claim per name across teams (409, whatever the case or trailing dot), the records to
//! create, tenancy (404), removal, verification jobs on the node's domain queue in Redis, the
//! agent's reports moving the status (failed with what was found, verified → certificate
//! order, certificate → active, a failed renewal keeping the certificate), pod events, the
//! served-domains long poll (with the key, which Postgres holds only encrypted), the
//! re-verification worker detaching a domain whose proof is gone, and the ACME account's
//! first writer winning.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use instapod_tests::{ControlPlane, ControlPlaneOptions, TestUser, eventually, redis, register_and_login};
use serde_json::{Value, json};
use uuid::Uuid;

const JOIN_TOKEN: &str = "domains-test-join-token-0123456789";
const APPS_DOMAIN: &str = "apps.domains.test";
const INGRESS_ADDRESS: &str = "192.0.2.10";
const WAIT: Duration = Duration::from_secs(20);

/// A control plane, a joined healthy node and a user with a pod.
struct Setup {
    cp: ControlPlane,
    redis_url: String,
    node_id: String,
    node_token: String,
    user: TestUser,
    pod: String,
}

async fn setup_with(env: &[(&str, &str)]) -> Setup {
    let redis_url = redis::shared().next_url();
    let mut options = ControlPlaneOptions::default()
        .redis_url(&redis_url)
        .env("INSTAPOD_NODE_JOIN_TOKEN", JOIN_TOKEN)
        .env("INSTAPOD_NODE_HEARTBEAT_TIMEOUT_SECS", "3600")
        .env("INSTAPOD_APPS_DOMAIN", APPS_DOMAIN)
        .env(
            "INSTAPOD_DOMAINS__INGRESS_ADDRESSES",
            &format!("[\"{INGRESS_ADDRESS}\"]"),
        )
        .env("INSTAPOD_DOMAINS__WORKER_INTERVAL_SECS", "1");
    for (key, value) in env {
        options = options.env(key, value);
    }
    let cp = ControlPlane::start(options).await;
    let (node_id, node_token) = join_node(&cp, "domains-node").await;
    let user = register_and_login(&cp).await;
    let pod = create_pod(&user, "web").await;
    Setup {
        cp,
        redis_url,
        node_id,
        node_token,
        user,
        pod,
    }
}

async fn setup() -> Setup {
    setup_with(&[]).await
}

/// How many domains the control plane stores (all teams).
async fn domain_count(setup: &Setup) -> i64 {
    setup
        .cp
        .db()
        .await
        .query_one("SELECT count(*) FROM domains", &[])
        .await
        .expect("count")
        .get(0)
}

/// Joins a node and sends one heartbeat (healthy); returns its id and token.
async fn join_node(cp: &ControlPlane, name: &str) -> (String, String) {
    let joined = cp
        .client()
        .with_token(JOIN_TOKEN)
        .post_json(
            "/internal/nodes/join",
            &json!({"name": name, "region": "local", "labels": {}, "agent_version": "test"}),
        )
        .await
        .json_with_status(200);
    let id = joined["node_id"].as_str().expect("node_id").to_string();
    let token = joined["node_token"].as_str().expect("node_token").to_string();
    cp.client()
        .with_token(&token)
        .post_json(
            &format!("/internal/nodes/{id}/heartbeat"),
            &json!({
                "total": {"cpu_millis": 4000, "memory_bytes": 8_589_934_592u64, "disk_bytes": 100_000_000_000u64},
                "allocatable": {"cpu_millis": 4000, "memory_bytes": 8_589_934_592u64, "disk_bytes": 100_000_000_000u64},
                "region": "local",
                "labels": {},
                "agent_version": "test",
                "pods": [],
            }),
        )
        .await
        .assert_status(200);
    (id, token)
}

async fn create_pod(user: &TestUser, name: &str) -> String {
    user.client()
        .post_json("/api/pods", &json!({"name": name, "image": "busybox:latest"}))
        .await
        .assert_status(202);
    name.to_string()
}

async fn add_domain(user: &TestUser, pod: &str, hostname: &str) -> Value {
    user.client()
        .post_json(&format!("/api/pods/{pod}/domains"), &json!({"hostname": hostname}))
        .await
        .json_with_status(201)
}

/// The first domain of `pod`'s list whose `field` is `value`.
async fn listed_domain(user: &TestUser, pod: &str, field: &str, value: &str) -> Value {
    let list = user
        .client()
        .get_response(&format!("/api/pods/{pod}/domains"))
        .await
        .json_with_status(200);
    list["domains"]
        .as_array()
        .expect("a domains array")
        .iter()
        .find(|d| d[field] == value)
        .cloned()
        .unwrap_or_else(|| panic!("no domain with {field} {value} in {list}"))
}

async fn get_domain(user: &TestUser, pod: &str, id: &str) -> Value {
    listed_domain(user, pod, "id", id).await
}

async fn events(user: &TestUser, pod: &str) -> Vec<String> {
    let body = user
        .client()
        .get_response(&format!("/api/pods/{pod}/events?limit=200"))
        .await
        .json_with_status(200);
    body["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "domain")
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The jobs waiting on `domains:<node_id>`, oldest first, as JSON: apalis-redis keeps a pushed
/// job in the queue's scheduled set (due at once) until a consumer moves it to the active list.
fn domain_jobs(redis_url: &str, node_id: &str) -> Vec<Value> {
    let config = instapod_common::queue::config(instapod_common::domains::domains_queue(
        Uuid::parse_str(node_id).expect("a node id"),
    ));
    let scheduled = redis_cli_raw(redis_url, &["ZRANGE", &config.scheduled_jobs_set(), "0", "-1"]);
    let active = redis_cli_raw(redis_url, &["LRANGE", &config.active_jobs_list(), "0", "-1"]);
    scheduled
        .lines()
        .chain(active.lines())
        .filter(|id| !id.is_empty())
        .map(|id| {
            let payload = redis_cli_raw(redis_url, &["HGET", &config.job_data_hash(), id]);
            serde_json::from_str(&payload).unwrap_or_else(|err| panic!("job {id} is not JSON ({err}): {payload}"))
        })
        .collect()
}

fn redis_cli_raw(url: &str, args: &[&str]) -> String {
    let database = url.rsplit('/').next().unwrap_or("0");
    let output = std::process::Command::new("redis-cli")
        .args(["-p", &redis::shared().port().to_string(), "-n", database, "--raw"])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Waits for a job with `op` about `domain_id` on the node's queue.
async fn wait_job(setup: &Setup, op: &str, domain_id: &str) -> Value {
    eventually(WAIT, &format!("a {op} job for {domain_id}"), || async {
        domain_jobs(&setup.redis_url, &setup.node_id)
            .into_iter()
            .find(|job| job["op"] == op && job["domain_id"] == domain_id)
            .with_context(|| {
                format!(
                    "jobs: {:?}; keys: {}",
                    domain_jobs(&setup.redis_url, &setup.node_id),
                    redis_cli_raw(&setup.redis_url, &["KEYS", "*"])
                )
            })
    })
    .await
}

fn node_client(setup: &Setup) -> instapod_tests::Client {
    setup.cp.client().with_token(&setup.node_token)
}

fn internal(setup: &Setup, rest: &str) -> String {
    format!("/internal/nodes/{}{rest}", setup.node_id)
}

fn check(record_type: &str, name: &str, expected: &[&str], found: &[&str], ok: bool) -> Value {
    json!({"record_type": record_type, "name": name, "expected": expected, "found": found, "ok": ok, "error": null})
}

fn certificate_body(chain: &str, key: &str, days: i64) -> Value {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    json!({"chain_pem": chain, "key_pem": key, "not_before": now - 60, "not_after": now + days * 86_400})
}

#[tokio::test]
async fn hostnames_are_normalised_or_refused() {
    let setup = setup().await;
    let path = format!("/api/pods/{}/domains", setup.pod);
    for (input, stored) in [
        ("Shop.Example.COM", "shop.example.com"),
        ("blog.example.com.", "blog.example.com"),
        ("bücher.example.org", "xn--bcher-kva.example.org"),
        ("  www.example.net  ", "www.example.net"),
        ("example.org", "example.org"),
    ] {
        let body = add_domain(&setup.user, &setup.pod, input).await;
        assert_eq!(body["hostname"], stored, "{input:?}: {body}");
        assert_eq!(body["status"], "pending_dns", "{body}");
    }
    let long_label = format!("{}.example.com", "a".repeat(64));
    let long_name = format!("{}.com", ["abcdefghi"; 26].join("."));
    for (input, code) in [
        ("", "invalid_hostname"),
        ("127.0.0.1", "invalid_hostname"),
        ("2001:db8::1", "invalid_hostname"),
        ("*.example.com", "invalid_hostname"),
        ("localhost", "invalid_hostname"),
        ("com", "invalid_hostname"),
        ("-bad.example.com", "invalid_hostname"),
        ("bad-.example.com", "invalid_hostname"),
        ("under_score.example.com", "invalid_hostname"),
        ("two..dots.example.com", "invalid_hostname"),
        ("https://shop.example.com/", "invalid_hostname"),
        (long_label.as_str(), "invalid_hostname"),
        (long_name.as_str(), "invalid_hostname"),
        (APPS_DOMAIN, "hostname_reserved"),
        ("web-someone.apps.domains.test", "hostname_reserved"),
        ("WEB-someone.Apps.Domains.Test.", "hostname_reserved"),
        ("127.0.0.1.nip.localhost", "hostname_reserved"),
    ] {
        setup
            .user
            .client()
            .post_json(&path, &json!({"hostname": input}))
            .await
            .assert_error(400, code);
    }
    // The control plane's own host name (127.0.0.1 here) is an IP; unknown fields are refused.
    setup
        .user
        .client()
        .post_json(&path, &json!({"hostname": "x.example.com", "extra": 1}))
        .await
        .assert_error(400, "invalid_json");
    let count = domain_count(&setup).await;
    assert_eq!(count, 5, "only the valid names were stored");
}

#[tokio::test]
async fn a_name_is_claimed_once_across_teams() {
    let setup = setup().await;
    add_domain(&setup.user, &setup.pod, "shop.claimed.example").await;
    let other = register_and_login(&setup.cp).await;
    let other_pod = create_pod(&other, "site").await;
    for variant in [
        "shop.claimed.example",
        "SHOP.Claimed.Example",
        "shop.claimed.example.",
        "Shop.Claimed.Example.",
    ] {
        let message = other
            .client()
            .post_json(&format!("/api/pods/{other_pod}/domains"), &json!({"hostname": variant}))
            .await
            .assert_error(409, "domain_taken");
        assert!(message.contains("shop.claimed.example"), "{message}");
    }
    // The owner cannot add it twice either, not even on another pod.
    setup
        .user
        .client()
        .post_json(
            &format!("/api/pods/{}/domains", setup.pod),
            &json!({"hostname": "Shop.claimed.example."}),
        )
        .await
        .assert_error(409, "domain_taken");
    // Once removed, another team may claim it, with a new token.
    let first = get_domain_by_name(&setup.user, &setup.pod, "shop.claimed.example").await;
    setup
        .user
        .client()
        .delete_response(&format!(
            "/api/pods/{}/domains/{}",
            setup.pod,
            first["id"].as_str().unwrap_or_default()
        ))
        .await
        .assert_status(204);
    let second = add_domain(&other, &other_pod, "shop.claimed.example").await;
    assert_ne!(
        second["records"][0]["value"], first["records"][0]["value"],
        "a new token"
    );
}

async fn get_domain_by_name(user: &TestUser, pod: &str, hostname: &str) -> Value {
    listed_domain(user, pod, "hostname", hostname).await
}

#[tokio::test]
async fn the_records_to_create_are_shown() {
    let setup = setup().await;
    let pod = setup
        .user
        .client()
        .get_response(&format!("/api/pods/{}", setup.pod))
        .await
        .json_with_status(200);
    let pod_host = pod["urls"][0]
        .as_str()
        .and_then(|url| url.strip_prefix("http://"))
        .map(|rest| rest.split([':', '/']).next().unwrap_or_default().to_string())
        .expect("the pod's URL");
    assert!(pod_host.ends_with(APPS_DOMAIN), "{pod_host}");

    let sub = add_domain(&setup.user, &setup.pod, "www.records.example").await;
    let records = sub["records"].as_array().expect("records");
    assert_eq!(records.len(), 2, "{sub}");
    assert_eq!(records[0]["type"], "TXT");
    assert_eq!(records[0]["name"], "_instapod-challenge.www.records.example");
    let token = records[0]["value"].as_str().expect("a TXT value");
    assert!(
        token.starts_with("instapod-verify=") && token.len() >= 16 + 43,
        "{token}"
    );
    assert_eq!(
        records[1],
        json!({"type": "CNAME", "name": "www.records.example", "value": pod_host})
    );
    for field in [
        "checks",
        "verified_at",
        "last_checked_at",
        "certificate",
        "status_message",
    ] {
        assert!(sub[field].is_null(), "{field} in {sub}");
    }
    assert!(sub["created_at"].is_string(), "{sub}");
    assert!(sub["id"].is_string(), "{sub}");

    let apex = add_domain(&setup.user, &setup.pod, "records.example").await;
    let records = apex["records"].as_array().expect("records");
    assert_eq!(records.len(), 2, "{apex}");
    assert_eq!(records[0]["type"], "TXT");
    assert_eq!(
        records[1],
        json!({"type": "A", "name": "records.example", "value": INGRESS_ADDRESS})
    );
    assert_ne!(
        apex["records"][0]["value"], sub["records"][0]["value"],
        "a token per domain"
    );
}

#[tokio::test]
async fn apex_domains_need_ingress_addresses() {
    let setup = setup_with(&[("INSTAPOD_DOMAINS__INGRESS_ADDRESSES", "[]")]).await;
    setup
        .user
        .client()
        .post_json(
            &format!("/api/pods/{}/domains", setup.pod),
            &json!({"hostname": "apex.example"}),
        )
        .await
        .assert_error(400, "apex_domain_unsupported");
    add_domain(&setup.user, &setup.pod, "www.apex.example").await;
}

#[tokio::test]
async fn another_teams_pods_and_domains_are_404() {
    let setup = setup().await;
    let domain = add_domain(&setup.user, &setup.pod, "tenant.example.com").await;
    let id = domain["id"].as_str().expect("id");
    let other = register_and_login(&setup.cp).await;
    let own_pod = create_pod(&other, "mine").await;
    let pod = &setup.pod;
    for (method, path) in [
        ("GET", format!("/api/pods/{pod}/domains")),
        ("POST", format!("/api/pods/{pod}/domains")),
        ("DELETE", format!("/api/pods/{pod}/domains/{id}")),
        ("POST", format!("/api/pods/{pod}/domains/{id}/verify")),
        // Their own pod, but our domain.
        ("DELETE", format!("/api/pods/{own_pod}/domains/{id}")),
        ("POST", format!("/api/pods/{own_pod}/domains/{id}/verify")),
        // Unknown and malformed ids.
        ("DELETE", format!("/api/pods/{own_pod}/domains/{}", Uuid::new_v4())),
        ("POST", format!("/api/pods/{own_pod}/domains/not-a-uuid/verify")),
    ] {
        let client = other.client();
        let response = match method {
            "GET" => client.get_response(&path).await,
            "DELETE" => client.delete_response(&path).await,
            _ => {
                client
                    .post_json(&path, &json!({"hostname": "x.tenant.example.com"}))
                    .await
            }
        };
        response.assert_error(404, "not_found");
    }
    // Unauthenticated: 401.
    setup
        .cp
        .client()
        .get_response(&format!("/api/pods/{pod}/domains"))
        .await
        .assert_error(401, "unauthorized");
    // Nothing changed for the owner.
    assert_eq!(get_domain(&setup.user, pod, id).await["status"], "pending_dns");
}

#[tokio::test]
async fn a_removed_domain_is_gone_and_the_feed_wakes_at_once() {
    let setup = setup().await;
    let domain = add_domain(&setup.user, &setup.pod, "gone.example.com").await;
    let id = domain["id"].as_str().expect("id").to_string();
    // Served from verification on (straight into the database: the report path is tested below).
    setup
        .cp
        .db()
        .await
        .execute(
            "UPDATE domains SET status = 'issuing_certificate', next_issue_at = now() + interval '1 hour' WHERE id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("mark served");
    let feed = eventually(WAIT, "the domain is served", || async {
        let response = node_client(&setup).get_response(&internal(&setup, "/domains")).await;
        let body = response.json_with_status(200);
        ensure!(body["domains"].as_array().is_some_and(|d| d.len() == 1), "{body}");
        Ok(response)
    })
    .await;
    let etag = feed.header("etag").expect("an ETag");
    assert_eq!(feed.header("cache-control").as_deref(), Some("no-store"));
    let body = feed.json();
    assert_eq!(body["domains"][0]["hostname"], "gone.example.com");
    assert_eq!(body["domains"][0]["domain_id"], id.as_str());
    assert!(body["domains"][0]["certificate"].is_null(), "{body}");
    // Unchanged: 304.
    node_client(&setup)
        .get(&internal(&setup, "/domains"))
        .header("If-None-Match", &etag)
        .send()
        .await
        .assert_status(304);

    // A long poll, woken by the removal.
    let poll = {
        let client = node_client(&setup);
        let path = internal(&setup, "/domains?wait=20");
        let etag = etag.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let response = client.get(&path).header("If-None-Match", &etag).send().await;
            (started.elapsed(), response)
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    setup
        .user
        .client()
        .delete_response(&format!("/api/pods/{}/domains/{id}", setup.pod))
        .await
        .assert_status(204);
    let (took, response) = poll.await.expect("the poll");
    let body = response.json_with_status(200);
    assert_eq!(body["domains"], json!([]), "{body}");
    assert_ne!(response.header("etag"), Some(etag));
    assert!(took < Duration::from_secs(6), "the long poll took {took:?}");

    let list = setup
        .user
        .client()
        .get_response(&format!("/api/pods/{}/domains", setup.pod))
        .await
        .json_with_status(200);
    assert_eq!(list["domains"], json!([]));
    setup
        .user
        .client()
        .delete_response(&format!("/api/pods/{}/domains/{id}", setup.pod))
        .await
        .assert_error(404, "not_found");
    assert!(
        events(&setup.user, &setup.pod)
            .await
            .iter()
            .any(|e| e.contains("gone.example.com removed"))
    );
    // A report about it now: 404, so the agent drops its job.
    node_client(&setup)
        .post_json(
            &internal(&setup, &format!("/domains/{id}/verification")),
            &json!({"verified": true, "checks": []}),
        )
        .await
        .assert_error(404, "domain_not_found");
}

#[tokio::test]
async fn verification_and_certificates_through_the_node_reports() {
    let setup = setup().await;
    let hostname = "shop.flow.example";
    let domain = add_domain(&setup.user, &setup.pod, hostname).await;
    let id = domain["id"].as_str().expect("id").to_string();
    let token = domain["records"][0]["value"].as_str().expect("token").to_string();
    let cname = domain["records"][1]["value"].as_str().expect("cname").to_string();

    // Verify: 202 and a job on the node's domain queue.
    let accepted = setup
        .user
        .client()
        .post(&format!("/api/pods/{}/domains/{id}/verify", setup.pod))
        .send()
        .await
        .json_with_status(202);
    assert_eq!(accepted["id"], id.as_str());
    let job = wait_job(&setup, "verify", &id).await;
    assert_eq!(job["hostname"], hostname);
    assert_eq!(job["expected"]["txt_name"], format!("_instapod-challenge.{hostname}"));
    assert_eq!(job["expected"]["txt_value"], token.as_str());
    assert_eq!(job["expected"]["cname_target"], cname.as_str());
    assert_eq!(job["expected"]["addresses"], json!([INGRESS_ADDRESS]));

    // A wrong TXT record: failed, naming what was found, and a pod event (once, though the
    // report comes twice).
    let txt_name = format!("_instapod-challenge.{hostname}");
    for _ in 0..2 {
        node_client(&setup)
            .post_json(
                &internal(&setup, &format!("/domains/{id}/verification")),
                &json!({"verified": false, "checks": [
                    check("TXT", &txt_name, &[&token], &["instapod-verify=someone-elses"], false),
                    check("CNAME", hostname, &[&cname], &[&cname], true),
                ]}),
            )
            .await
            .assert_status(204);
    }
    let failed = get_domain(&setup.user, &setup.pod, &id).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let message = failed["status_message"].as_str().expect("a message");
    assert!(
        message.contains("instapod-verify=someone-elses") && message.contains("TXT"),
        "{message}"
    );
    assert_eq!(failed["checks"][0]["found"], json!(["instapod-verify=someone-elses"]));
    assert!(
        failed["last_checked_at"].is_string() && failed["verified_at"].is_null(),
        "{failed}"
    );
    let found_events = events(&setup.user, &setup.pod)
        .await
        .into_iter()
        .filter(|e| e.contains(hostname) && e.contains("someone-elses"))
        .count();
    assert_eq!(found_events, 1, "one pod event names what was found");
    // Not served, and no certificate order for a domain that did not verify.
    let feed = node_client(&setup)
        .get_response(&internal(&setup, "/domains"))
        .await
        .json_with_status(200);
    assert_eq!(feed["domains"], json!([]));
    assert!(
        !domain_jobs(&setup.redis_url, &setup.node_id)
            .iter()
            .any(|j| j["op"] == "issue_certificate")
    );

    // Fixed: verified, and a certificate order on the node's queue at once.
    node_client(&setup)
        .post_json(
            &internal(&setup, &format!("/domains/{id}/verification")),
            &json!({"verified": true, "checks": [
                check("TXT", &txt_name, &[&token], &[&token], true),
                check("CNAME", hostname, &[&cname], &[&cname], true),
            ]}),
        )
        .await
        .assert_status(204);
    let issuing = get_domain(&setup.user, &setup.pod, &id).await;
    assert_eq!(issuing["status"], "issuing_certificate", "{issuing}");
    assert!(
        issuing["verified_at"].is_string() && issuing["status_message"].is_null(),
        "{issuing}"
    );
    let order = wait_job(&setup, "issue_certificate", &id).await;
    assert_eq!(order["hostname"], hostname);
    assert!(
        events(&setup.user, &setup.pod)
            .await
            .iter()
            .any(|e| e == &format!("domain {hostname} verified"))
    );
    // Served (without a certificate yet) from verification on.
    let feed = node_client(&setup)
        .get_response(&internal(&setup, "/domains"))
        .await
        .json_with_status(200);
    assert_eq!(feed["domains"][0]["hostname"], hostname, "{feed}");
    assert!(feed["domains"][0]["certificate"].is_null());

    // A certificate for another name is refused.
    let (wrong_chain, wrong_key) = instapod_tests::acme::self_signed("other.flow.example", 30);
    let refused = node_client(&setup)
        .put_json(
            &internal(&setup, &format!("/domains/{id}/certificate")),
            &certificate_body(&wrong_chain, &wrong_key, 30),
        )
        .await
        .assert_error(400, "invalid_certificate");
    assert!(refused.contains("does not cover"), "{refused}");
    // A key that is not the leaf's is refused.
    // 60 days: outside the default renewal window (30 days), so no renewal is ordered.
    let (chain, key) = instapod_tests::acme::self_signed(hostname, 60);
    node_client(&setup)
        .put_json(
            &internal(&setup, &format!("/domains/{id}/certificate")),
            &certificate_body(&chain, &wrong_key, 60),
        )
        .await
        .assert_error(400, "invalid_certificate");

    // The certificate (sent twice: stored once): active, served with its key, the key
    // encrypted in Postgres.
    for _ in 0..2 {
        node_client(&setup)
            .put_json(
                &internal(&setup, &format!("/domains/{id}/certificate")),
                &certificate_body(&chain, &key, 60),
            )
            .await
            .assert_status(204);
    }
    let active = get_domain(&setup.user, &setup.pod, &id).await;
    assert_eq!(active["status"], "active", "{active}");
    let not_after = active["certificate"]["not_after"]
        .as_str()
        .expect("not_after")
        .to_string();
    let expires =
        time::OffsetDateTime::parse(&not_after, &time::format_description::well_known::Rfc3339).expect("RFC 3339");
    let days = (expires - time::OffsetDateTime::now_utc()).whole_days();
    assert!((59..=60).contains(&days), "read from the certificate: {not_after}");
    assert_eq!(active["certificate"]["issuer"], hostname, "self-signed");
    let feed = eventually(WAIT, "the certificate is served", || async {
        let body = node_client(&setup)
            .get_response(&internal(&setup, "/domains"))
            .await
            .json_with_status(200);
        ensure!(!body["domains"][0]["certificate"].is_null(), "{body}");
        Ok(body)
    })
    .await;
    let served = &feed["domains"][0]["certificate"];
    assert_eq!(served["chain_pem"], chain.as_str());
    assert_eq!(served["key_pem"], key.as_str());
    assert_eq!(served["not_after"].as_i64(), Some(expires.unix_timestamp()));
    let stored: Vec<u8> = setup
        .cp
        .db()
        .await
        .query_one(
            "SELECT key_encrypted FROM domain_certificates WHERE domain_id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("a stored certificate")
        .get(0);
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        !String::from_utf8_lossy(&stored).contains("PRIVATE KEY"),
        "stored in plain text"
    );
    assert!(
        !String::from_utf8_lossy(&stored).contains(&key_body[..20]),
        "stored in plain text"
    );
    assert!(stored.len() > key.len(), "nonce and tag stored with the value");
    let issued_events = events(&setup.user, &setup.pod)
        .await
        .into_iter()
        .filter(|e| e.starts_with(&format!("certificate for {hostname} issued")))
        .count();
    assert_eq!(issued_events, 1);

    // A failed renewal keeps the domain active with its certificate, and backs off.
    node_client(&setup)
        .post_json(
            &internal(&setup, &format!("/domains/{id}/certificate-failure")),
            &json!({"message": "urn:ietf:params:acme:error:rateLimited: too many certificates", "rate_limited": true, "retry_after_secs": 7200}),
        )
        .await
        .assert_status(204);
    let still = get_domain(&setup.user, &setup.pod, &id).await;
    assert_eq!(still["status"], "active", "{still}");
    assert_eq!(still["certificate"]["not_after"], not_after.as_str());
    let message = still["status_message"].as_str().expect("a message");
    assert!(
        message.contains("rate limited") && message.contains("7200 s"),
        "{message}"
    );
    let next: f64 = setup
        .cp
        .db()
        .await
        .query_one(
            "SELECT extract(epoch FROM next_issue_at - now())::float8 FROM domains WHERE id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("next_issue_at")
        .get(0);
    assert!(
        (7000.0..=7200.0).contains(&next),
        "the CA's retry-after is respected: {next}"
    );
    let feed = node_client(&setup)
        .get_response(&internal(&setup, "/domains"))
        .await
        .json_with_status(200);
    assert_eq!(
        feed["domains"][0]["certificate"]["key_pem"],
        key.as_str(),
        "still served"
    );
    assert!(
        events(&setup.user, &setup.pod)
            .await
            .iter()
            .any(|e| e.contains("certificate order failed (rate limited)"))
    );
}

#[tokio::test]
async fn the_worker_reverifies_and_detaches_a_domain_whose_proof_is_gone() {
    let setup = setup().await;
    let hostname = "re.verify.example";
    let domain = add_domain(&setup.user, &setup.pod, hostname).await;
    let id = domain["id"].as_str().expect("id").to_string();
    let token = domain["records"][0]["value"].as_str().expect("token").to_string();
    node_client(&setup)
        .post_json(
            &internal(&setup, &format!("/domains/{id}/verification")),
            &json!({"verified": true, "checks": []}),
        )
        .await
        .assert_status(204);
    let (chain, key) = instapod_tests::acme::self_signed(hostname, 90);
    node_client(&setup)
        .put_json(
            &internal(&setup, &format!("/domains/{id}/certificate")),
            &certificate_body(&chain, &key, 90),
        )
        .await
        .assert_status(204);
    assert_eq!(get_domain(&setup.user, &setup.pod, &id).await["status"], "active");
    // Due for re-verification: the worker (every second here) sends a verify job.
    setup
        .cp
        .db()
        .await
        .execute(
            "UPDATE domains SET reverify_at = now() - interval '1 second' WHERE id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("make it due");
    let job = wait_job(&setup, "verify", &id).await;
    assert_eq!(job["expected"]["txt_value"], token.as_str());
    // A resolver error is not proof of anything: still active and served.
    let txt_name = format!("_instapod-challenge.{hostname}");
    node_client(&setup)
        .post_json(
            &internal(&setup, &format!("/domains/{id}/verification")),
            &json!({"verified": false, "checks": [{"record_type": "TXT", "name": txt_name, "expected": [token], "found": [], "ok": false, "error": "timed out"}]}),
        )
        .await
        .assert_status(204);
    assert_eq!(get_domain(&setup.user, &setup.pod, &id).await["status"], "active");
    // The TXT record is gone: detached, no longer served.
    node_client(&setup)
        .post_json(
            &internal(&setup, &format!("/domains/{id}/verification")),
            &json!({"verified": false, "checks": [check("TXT", &txt_name, &[&token], &[], false)]}),
        )
        .await
        .assert_status(204);
    let detached = get_domain(&setup.user, &setup.pod, &id).await;
    assert_eq!(detached["status"], "failed", "{detached}");
    let message = detached["status_message"].as_str().expect("a message");
    assert!(
        message.contains("detached") && message.contains("found nothing"),
        "{message}"
    );
    eventually(WAIT, "no longer served", || async {
        let feed = node_client(&setup)
            .get_response(&internal(&setup, "/domains"))
            .await
            .json_with_status(200);
        ensure!(feed["domains"] == json!([]), "{feed}");
        Ok(())
    })
    .await;
    // Verified again: its certificate still works, so it is active again at once.
    node_client(&setup)
        .post_json(
            &internal(&setup, &format!("/domains/{id}/verification")),
            &json!({"verified": true, "checks": []}),
        )
        .await
        .assert_status(204);
    assert_eq!(get_domain(&setup.user, &setup.pod, &id).await["status"], "active");
}

#[tokio::test]
async fn certificates_close_to_expiry_are_renewed_by_the_worker() {
    let setup = setup_with(&[("INSTAPOD_DOMAINS__RENEW_BEFORE_SECS", "864000")]).await;
    let hostname = "renew.example.com";
    let domain = add_domain(&setup.user, &setup.pod, hostname).await;
    let id = domain["id"].as_str().expect("id").to_string();
    node_client(&setup)
        .post_json(
            &internal(&setup, &format!("/domains/{id}/verification")),
            &json!({"verified": true, "checks": []}),
        )
        .await
        .assert_status(204);
    wait_job(&setup, "issue_certificate", &id).await;
    // A certificate that expires in 5 days, within renew_before (10 days).
    let (chain, key) = instapod_tests::acme::self_signed(hostname, 5);
    node_client(&setup)
        .put_json(
            &internal(&setup, &format!("/domains/{id}/certificate")),
            &certificate_body(&chain, &key, 5),
        )
        .await
        .assert_status(204);
    assert_eq!(get_domain(&setup.user, &setup.pod, &id).await["status"], "active");
    let orders = |setup: &Setup| {
        domain_jobs(&setup.redis_url, &setup.node_id)
            .into_iter()
            .filter(|j| j["op"] == "issue_certificate" && j["domain_id"] == id.as_str())
            .count()
    };
    eventually(WAIT, "a renewal order", || async {
        ensure!(orders(&setup) == 2, "{} orders", orders(&setup));
        Ok(())
    })
    .await;
    // One order in flight at a time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(orders(&setup), 2);
    assert_eq!(get_domain(&setup.user, &setup.pod, &id).await["status"], "active");
}

#[tokio::test]
async fn the_acme_account_is_stored_once_and_encrypted() {
    let setup = setup().await;
    let account = node_client(&setup)
        .get_response(&internal(&setup, "/acme-account"))
        .await
        .json_with_status(200);
    assert!(account["credentials"].is_null(), "{account}");
    let directory = account["directory_url"].as_str().expect("directory_url").to_string();
    assert_eq!(directory, "https://acme-v02.api.letsencrypt.org/directory");

    let first =
        json!({"id": "https://ca.example/acct/1", "key_pkcs8": "c2VjcmV0LWFjY291bnQta2V5", "directory": directory});
    let second = json!({"id": "https://ca.example/acct/2", "key_pkcs8": "b3RoZXI", "directory": directory});
    let stored = node_client(&setup)
        .put_json(
            &internal(&setup, "/acme-account"),
            &json!({"directory_url": directory, "credentials": first}),
        )
        .await
        .json_with_status(200);
    assert_eq!(stored["credentials"], first);
    // Another node creating its own account meanwhile gets the first one.
    let (other_id, other_token) = join_node(&setup.cp, "domains-node-2").await;
    let kept = setup
        .cp
        .client()
        .with_token(&other_token)
        .put_json(
            &format!("/internal/nodes/{other_id}/acme-account"),
            &json!({"directory_url": directory, "credentials": second}),
        )
        .await
        .json_with_status(200);
    assert_eq!(kept["credentials"], first, "the first writer wins");
    let read = node_client(&setup)
        .get_response(&internal(&setup, "/acme-account"))
        .await
        .json_with_status(200);
    assert_eq!(read["credentials"], first);
    let sealed: Vec<u8> = setup
        .cp
        .db()
        .await
        .query_one("SELECT credentials_encrypted FROM acme_accounts", &[])
        .await
        .expect("one account")
        .get(0);
    assert!(
        !String::from_utf8_lossy(&sealed).contains("c2VjcmV0"),
        "stored in plain text"
    );
    // Credentials must be an object.
    node_client(&setup)
        .put_json(
            &internal(&setup, "/acme-account"),
            &json!({"directory_url": directory, "credentials": null}),
        )
        .await
        .assert_error(400, "validation_failed");
}

#[tokio::test]
async fn the_internal_domain_api_needs_the_nodes_own_token() {
    let setup = setup().await;
    let domain = add_domain(&setup.user, &setup.pod, "auth.example.com").await;
    let id = domain["id"].as_str().expect("id");
    let other_node = Uuid::new_v4();
    for client in [
        setup.cp.client(),
        setup.cp.client().with_token("not-a-node-token"),
        setup.cp.client().with_token(JOIN_TOKEN),
    ] {
        client
            .get_response(&internal(&setup, "/domains"))
            .await
            .assert_error(401, "invalid_node_token");
        client
            .post_json(
                &internal(&setup, &format!("/domains/{id}/verification")),
                &json!({"verified": true, "checks": []}),
            )
            .await
            .assert_error(401, "invalid_node_token");
        client
            .get_response(&internal(&setup, "/acme-account"))
            .await
            .assert_error(401, "invalid_node_token");
    }
    // The right token for another node id.
    node_client(&setup)
        .get_response(&format!("/internal/nodes/{other_node}/domains"))
        .await
        .assert_error(401, "invalid_node_token");
    assert_eq!(get_domain(&setup.user, &setup.pod, id).await["status"], "pending_dns");
}

#[tokio::test]
async fn deleting_the_pod_deletes_its_domains() {
    let setup = setup().await;
    let domain = add_domain(&setup.user, &setup.pod, "pod.gone.example").await;
    let id = domain["id"].as_str().expect("id").to_string();
    node_client(&setup)
        .post_json(
            &internal(&setup, &format!("/domains/{id}/verification")),
            &json!({"verified": true, "checks": []}),
        )
        .await
        .assert_status(204);
    let served = node_client(&setup)
        .get_response(&internal(&setup, "/domains"))
        .await
        .json_with_status(200);
    assert_eq!(served["domains"][0]["hostname"], "pod.gone.example", "{served}");
    setup
        .user
        .client()
        .delete_response(&format!("/api/pods/{}", setup.pod))
        .await
        .assert_status(202);
    let count = domain_count(&setup).await;
    assert_eq!(count, 0, "the domains went with the pod");
    eventually(WAIT, "no longer served", || async {
        let feed = node_client(&setup)
            .get_response(&internal(&setup, "/domains"))
            .await
            .json_with_status(200);
        ensure!(feed["domains"] == json!([]), "{feed}");
        Ok(())
    })
    .await;
    // The name is free again.
    let other = register_and_login(&setup.cp).await;
    let other_pod = create_pod(&other, "next").await;
    add_domain(&other, &other_pod, "pod.gone.example").await;
}

#[tokio::test]
async fn concurrent_claims_of_one_name_leave_exactly_one_owner() {
    let setup = setup().await;
    let other = register_and_login(&setup.cp).await;
    let other_pod = create_pod(&other, "rival").await;
    let attempts = (0..8).map(|i| {
        let (client, pod) = if i % 2 == 0 {
            (setup.user.client(), setup.pod.clone())
        } else {
            (other.client(), other_pod.clone())
        };
        let spelling = if i % 3 == 0 {
            "RACE.example.com."
        } else {
            "race.example.com"
        };
        async move {
            client
                .post_json(&format!("/api/pods/{pod}/domains"), &json!({"hostname": spelling}))
                .await
        }
    });
    let responses = futures_util::future::join_all(attempts).await;
    let created = responses.iter().filter(|r| r.status == 201).count();
    for response in responses.iter().filter(|r| r.status != 201) {
        response.assert_error(409, "domain_taken");
    }
    assert_eq!(created, 1, "exactly one claim wins");
    let count: i64 = setup
        .cp
        .db()
        .await
        .query_one("SELECT count(*) FROM domains WHERE hostname = 'race.example.com'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 1);
}
