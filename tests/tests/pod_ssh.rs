//! SSH into pods end to end: the four SSH endpoints on a real control plane, and the stock
//! OpenSSH client (`ssh`, `ssh-keygen`) against a real node agent's gateway whose sessions run
//! in a real pod through containerd's exec.
//!
//! Covers the key rules (Ed25519, ECDSA, RSA-3072 accepted with `ssh-keygen`'s fingerprints;
//! DSA, RSA-1024 and garbage 400; the same key twice 409; list; remove by id or fingerprint;
//! another team's pod 404), the connection info, a command's output and exit status from inside
//! the container (its PID 1 is the pod's process, a file only the pod has), an interactive
//! session in a real terminal (prompt, `stty size` at the client's size and after a resize), a
//! wrong key, a key offered without its private half, a removed key and another team's key all
//! refused, a stopped pod refused cleanly with nothing run on the node, the per-address rate
//! limit, the metrics, and a host key that survives an agent restart.

use std::time::Duration;

use anyhow::ensure;
use instapod_tests::fleet::{Fleet, FleetOptions};
use instapod_tests::ssh::{self, KeyPair};
use instapod_tests::{TestUser, eventually, ids, process, scale_user};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
/// Failed authentications one address may make per minute in these tests.
const MAX_FAILURES: u32 = 5;

async fn fleet() -> Fleet {
    Fleet::start(
        FleetOptions::regions(["local"])
            .agent_env("INSTAPOD_AGENT_SSH__MAX_AUTH_FAILURES", &MAX_FAILURES.to_string())
            .agent_env("INSTAPOD_AGENT_SSH__BLOCK_SECS", "600"),
    )
    .await
}

/// Creates pod `name` running `script` (no wait).
async fn create_pod(user: &TestUser, name: &str, script: &str) {
    let image = instapod_tests::node::shell_image().await;
    user.client()
        .post_json(
            "/api/pods",
            &json!({"name": name, "image": image, "plan": "starter", "region": "local",
                    "command": ["sh", "-c", script]}),
        )
        .await
        .assert_status(202);
}

async fn wait_state(user: &TestUser, name: &str, state: &str) -> Value {
    user.wait_pod_state(name, state, WAIT).await
}

async fn add_key(user: &TestUser, pod: &str, line: &str) -> instapod_tests::Response {
    user.client()
        .post_json(&format!("/api/pods/{pod}/ssh/keys"), &json!({ "public_key": line }))
        .await
}

fn keys_dir() -> std::path::PathBuf {
    process::temp_dir("ssh-keys")
}

#[tokio::test]
async fn keys_api_rules_listing_removal_and_tenancy() {
    let fleet = fleet().await;
    let alice = scale_user(&fleet.cp).await;
    let mallory = scale_user(&fleet.cp).await;
    create_pod(&alice, "box", "exec sleep 100000").await;
    let dir = keys_dir();

    let mut added = Vec::new();
    for (kind, bits, algorithm, size) in [
        ("ed25519", None, "ssh-ed25519", 256),
        ("ecdsa", Some(256), "ecdsa-sha2-nistp256", 256),
        ("rsa", Some(3072), "ssh-rsa", 3072),
    ] {
        let key = ssh::keygen(&dir, &format!("ok-{kind}"), kind, bits).expect("keygen");
        let body = add_key(&alice, "box", &key.public).await.json_with_status(201);
        let expected = ssh::fingerprint(&key.path.with_extension("pub")).expect("fingerprint");
        assert_eq!(body["fingerprint"], expected.as_str(), "{body}");
        assert_eq!(body["algorithm"], algorithm, "{body}");
        assert_eq!(body["bits"], size, "{body}");
        assert_eq!(body["comment"], format!("ok-{kind}@instapod-test"), "{body}");
        added.push((body, key));
    }

    // Refused: DSA, short RSA, garbage; nothing stored.
    let dsa = ssh::keygen(&dir, "old-dsa", "dsa", None).expect("keygen dsa");
    let short = ssh::keygen(&dir, "short-rsa", "rsa", Some(1024)).expect("keygen rsa 1024");
    for (line, needle) in [
        (dsa.public.as_str(), "DSA"),
        (short.public.as_str(), "2048"),
        ("ssh-ed25519 AAAAnot-a-key", "OpenSSH"),
        ("hello world", "OpenSSH"),
        ("", "empty"),
    ] {
        let response = add_key(&alice, "box", line).await;
        let body = response.json_with_status(400);
        assert_eq!(body["error"]["code"], "invalid_ssh_key", "{line:?}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{line:?}: {message}");
    }
    // The same key twice (even with another comment) is a conflict.
    let (_, ed25519) = &added[0];
    let again = ed25519.public.replace("ok-ed25519@instapod-test", "renamed");
    let body = add_key(&alice, "box", &again).await.json_with_status(409);
    assert_eq!(body["error"]["code"], "ssh_key_exists", "{body}");

    let list = alice
        .client()
        .get("/api/pods/box/ssh/keys")
        .send()
        .await
        .json_with_status(200);
    let fingerprints: Vec<&str> = list["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["fingerprint"].as_str().unwrap_or_default())
        .collect();
    let expected: Vec<&str> = added
        .iter()
        .map(|(b, _)| b["fingerprint"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(fingerprints, expected);

    // Another team: every SSH endpoint of alice's pod is a 404, and nothing changes.
    let base = "/api/pods/box/ssh";
    mallory.client().get(base).send().await.assert_status(404);
    mallory
        .client()
        .get(&format!("{base}/keys"))
        .send()
        .await
        .assert_status(404);
    let mallory_key = ssh::keygen(&dir, "mallory", "ed25519", None).expect("keygen");
    add_key(&mallory, "box", &mallory_key.public).await.assert_status(404);
    let rsa_fingerprint = added[2].0["fingerprint"].as_str().expect("fp").to_string();
    mallory
        .client()
        .delete(&format!("{base}/keys"))
        .json(&json!({ "fingerprint": rsa_fingerprint }))
        .send()
        .await
        .assert_status(404);

    // Remove by fingerprint (query) and by id (body); a second removal is a 404.
    let ecdsa_fingerprint = added[1].0["fingerprint"].as_str().expect("fp").to_string();
    let query = format!(
        "{base}/keys?fingerprint={}",
        ecdsa_fingerprint
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
    );
    alice.client().delete(&query).send().await.assert_status(204);
    alice.client().delete(&query).send().await.assert_status(404);
    let id = added[0].0["id"].as_str().expect("id").to_string();
    alice
        .client()
        .delete(&format!("{base}/keys"))
        .json(&json!({ "id": id }))
        .send()
        .await
        .assert_status(204);
    let body = alice
        .client()
        .delete(&format!("{base}/keys"))
        .send()
        .await
        .json_with_status(400);
    assert_eq!(body["error"]["code"], "validation_failed", "{body}");
    let list = alice
        .client()
        .get(&format!("{base}/keys"))
        .send()
        .await
        .json_with_status(200);
    let left: Vec<&str> = list["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["fingerprint"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(left, vec![rsa_fingerprint.as_str()]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ssh` with `key` as `user`; (stdout, stderr, status).
async fn ssh_run(port: u16, key: &KeyPair, extra: &[&str], user: &str, command: &str) -> (String, String, i32) {
    let output = ssh::run(port, &key.path, extra, user, command).await.expect("ssh runs");
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        output.status.code().unwrap_or(-1),
    )
}

async fn metrics(fleet: &Fleet) -> String {
    instapod_tests::node::agent_metrics(fleet.nodes[0].metrics_port)
        .await
        .expect("agent metrics")
}

#[tokio::test]
async fn openssh_into_a_pod_and_every_refusal() {
    let mut fleet = fleet().await;
    let alice = scale_user(&fleet.cp).await;
    let bob = scale_user(&fleet.cp).await;
    let port = fleet.nodes[0].ssh_port;
    create_pod(
        &alice,
        "shell",
        "echo only-in-the-pod > /tmp/pod-marker; exec sleep 100000",
    )
    .await;
    create_pod(&bob, "bobs", "exec sleep 100000").await;
    wait_state(&alice, "shell", "running").await;
    wait_state(&bob, "bobs", "running").await;
    let dir = keys_dir();
    let key = ssh::keygen(&dir, "alice", "ed25519", None).expect("keygen");
    let other = ssh::keygen(&dir, "stranger", "ed25519", None).expect("keygen");
    let bob_key = ssh::keygen(&dir, "bob", "ecdsa", Some(256)).expect("keygen");
    add_key(&alice, "shell", &key.public).await.assert_status(201);
    add_key(&bob, "bobs", &bob_key.public).await.assert_status(201);

    // Connection info: this node's gateway and the pod's username.
    let info = alice
        .client()
        .get("/api/pods/shell/ssh")
        .send()
        .await
        .json_with_status(200);
    assert_eq!(info["host"], "127.0.0.1", "{info}");
    assert_eq!(info["port"], port, "{info}");
    let user = info["username"].as_str().expect("username").to_string();
    assert!(user.starts_with("shell-"), "{info}");
    assert_eq!(info["command"], format!("ssh -p {port} {user}@127.0.0.1"), "{info}");
    let bob_user = bob
        .client()
        .get("/api/pods/bobs/ssh")
        .send()
        .await
        .json_with_status(200)["username"]
        .as_str()
        .expect("username")
        .to_string();

    // A command: its output and exit status, and it ran inside the container.
    let (out, err, status) = ssh_run(port, &key, &[], &user, "echo hi; exit 7").await;
    assert_eq!((out.as_str(), status), ("hi\n", 7), "stderr: {err}");
    let (out, err, status) = ssh_run(
        port,
        &key,
        &[],
        &user,
        "cat /tmp/pod-marker; tr '\\0' ' ' < /proc/1/cmdline; echo; echo err-line >&2",
    )
    .await;
    assert_eq!(status, 0, "stderr: {err}");
    assert!(out.starts_with("only-in-the-pod\nsleep 100000"), "{out}");
    assert!(err.contains("err-line"), "stderr is passed as stderr: {err}");
    assert!(
        !std::path::Path::new("/tmp/pod-marker").exists(),
        "the marker is only in the pod"
    );
    // Input reaches the process and its end is seen (EOF closes stdin).
    let mut child = tokio::process::Command::new("ssh")
        .args(ssh::base_args(port, &key.path))
        .arg(format!("{user}@127.0.0.1"))
        .arg("wc -l")
        .env_remove("SSH_AUTH_SOCK")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"one\ntwo\nthree\n").await.expect("write");
    }
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("wc ends at EOF")
        .expect("ssh");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "3");

    // An interactive shell in a real terminal: prompt, size, resize, exit status.
    let steps: Vec<String> = [
        "expect:# ",
        "send:stty size; echo size-done",
        "expect:size-done",
        "send:echo T=$TERM",
        "expect:T=xterm-256color",
        "resize:40x100",
        "send:sleep 1; stty size",
        "expect:40 100",
        "send:exit 3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (screen, status) = ssh::interactive(port, &key.path, &user, (33, 111), &steps)
        .await
        .expect("interactive session");
    assert!(screen.contains("33 111"), "{screen}");
    assert!(screen.contains("40 100"), "{screen}");
    assert_eq!(status, 3, "{screen}");

    // Refused: a key not registered, a key offered without proof, another team's pod.
    let (out, err, status) = ssh_run(port, &other, &[], &user, "echo nope").await;
    assert_eq!((out.as_str(), status), ("", 255), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    let public_only = dir.join("public-only");
    std::fs::create_dir_all(&public_only).expect("dir");
    std::fs::copy(key.path.with_extension("pub"), public_only.join("alice.pub")).expect("copy");
    let (out, err, status) = ssh_run(
        port,
        &KeyPair {
            path: public_only.join("alice"),
            public: key.public.clone(),
        },
        &[],
        &user,
        "echo nope",
    )
    .await;
    assert_eq!(
        (out.as_str(), status),
        ("", 255),
        "a key offered without its private half: {err}"
    );
    let (out, err, status) = ssh_run(port, &key, &[], &bob_user, "echo nope").await;
    assert_eq!((out.as_str(), status), ("", 255), "alice's key on bob's pod: {err}");
    let (out, _, status) = ssh_run(port, &bob_key, &[], &bob_user, "echo bob").await;
    assert_eq!((out.as_str(), status), ("bob\n", 0));

    // A removed key stops working at once.
    let second = ssh::keygen(&dir, "second", "rsa", Some(3072)).expect("keygen");
    let added = add_key(&alice, "shell", &second.public).await.json_with_status(201);
    let (out, _, status) = ssh_run(port, &second, &[], &user, "echo rsa").await;
    assert_eq!((out.as_str(), status), ("rsa\n", 0));
    alice
        .client()
        .delete("/api/pods/shell/ssh/keys")
        .json(&json!({ "id": added["id"] }))
        .send()
        .await
        .assert_status(204);
    let (out, err, status) = ssh_run(port, &second, &[], &user, "echo rsa").await;
    assert_eq!((out.as_str(), status), ("", 255), "a removed key: {err}");

    // Metrics: sessions by outcome and refused authentications.
    let text = metrics(&fleet).await;
    assert!(
        text.contains("instapod_node_agent_ssh_sessions_total{outcome=\"exited_nonzero\"}")
            && !text.contains("instapod_node_agent_ssh_sessions_total{outcome=\"exited_nonzero\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("instapod_node_agent_ssh_auth_failures_total{reason=\"denied\"}")
            && !text.contains("instapod_node_agent_ssh_auth_failures_total{reason=\"denied\"} 0\n"),
        "{text}"
    );
    assert!(text.contains("instapod_node_agent_ssh_sessions_active 0"), "{text}");

    // Rate limit, per source address: after MAX_FAILURES failures from 127.0.0.9 even the right
    // key is refused from there, while 127.0.0.1 still gets in.
    for _ in 0..MAX_FAILURES {
        let (_, _, status) = ssh_run(port, &other, &["-b", "127.0.0.9"], &user, "true").await;
        assert_eq!(status, 255);
    }
    let (out, err, status) = ssh_run(port, &key, &["-b", "127.0.0.9"], &user, "echo in").await;
    assert_eq!((out.as_str(), status), ("", 255), "blocked address: {err}");
    let (out, _, status) = ssh_run(port, &key, &[], &user, "echo in").await;
    assert_eq!((out.as_str(), status), ("in\n", 0));
    assert!(
        !metrics(&fleet)
            .await
            .contains("instapod_node_agent_ssh_auth_failures_total{reason=\"rate_limited\"} 0\n")
    );

    // The host key survives an agent restart.
    let before = ssh::host_fingerprint(port).await.expect("host key");
    let key_file = fleet.nodes[0].state_dir.join("ssh_host_ed25519_key");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)
            .expect("host key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    fleet.restart_agent(0);
    let (out, _) = eventually(WAIT, "ssh after the agent restart", || async {
        let (out, err, status) = ssh_run(port, &key, &[], &user, "echo back").await;
        ensure!(status == 0, "status {status}: {err}");
        Ok((out, err))
    })
    .await;
    assert_eq!(out, "back\n");
    assert_eq!(ssh::host_fingerprint(port).await.expect("host key"), before);

    // A stopped pod: a clean refusal, and nothing runs on the node.
    alice
        .client()
        .post("/api/pods/shell/stop")
        .send()
        .await
        .assert_status(202);
    wait_state(&alice, "shell", "stopped").await;
    let marker = format!("/tmp/ssh-ran-on-the-node-{}", ids::random_suffix());
    let (out, err, status) = ssh_run(port, &key, &[], &user, &format!("touch {marker}; echo ran")).await;
    assert_eq!((out.as_str(), status), ("", 1), "{err}");
    assert!(err.contains("is not running"), "{err}");
    assert!(!std::path::Path::new(&marker).exists(), "nothing ran on the node");
    let (_, err, status) = ssh_run(port, &key, &["-tt"], &user, "").await;
    assert_eq!(status, 1, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
