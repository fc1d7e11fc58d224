//! The files API end to end: a real control plane forwarding to a real node agent whose pod
//! runs on containerd, its volume bind-mounted at `/data`.
//!
//! Covers every operation (list with paging and usage, JSON read with ranges and base64,
//! download with `Accept: application/octet-stream`, atomic write with create-only and
//! if-match, multipart upload, delete with and without `recursive`, folders with parents),
//! hostile paths (`..`, encoded, absolute, NUL, backslash), symlinks planted by the pod itself
//! (to `/`, to `/proc/self/root`, climbing with `../..`) and one the pod keeps swapping while
//! requests run, FIFOs and device files, the disk quota (507, nothing left), the request cap
//! (413, nothing left), concurrent writers and readers (never a torn file), another team's pod
//! (404), a pod not placed yet (409) and a stopped pod (still works).

use std::time::Duration;

use anyhow::ensure;
use base64::Engine;
use instapod_tests::fleet::{Fleet, FleetOptions};
use instapod_tests::{TestUser, eventually, ids, scale_user};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
/// The control plane's upload cap in these tests.
const UPLOAD_CAP: u64 = 8 * 1024 * 1024;

async fn fleet() -> Fleet {
    Fleet::start(
        FleetOptions::regions(["local"])
            .allocatable_cpu_millis(2000)
            .control_plane_env("INSTAPOD_FILES_MAX_UPLOAD_BYTES", &UPLOAD_CAP.to_string()),
    )
    .await
}

async fn create_pod(user: &TestUser, name: &str, region: &str, script: &str) -> Value {
    let image = instapod_tests::node::shell_image().await;
    user.client()
        .post_json(
            "/api/pods",
            &json!({"name": name, "image": image, "plan": "starter", "region": region,
                    "command": ["sh", "-c", script]}),
        )
        .await
        .json_with_status(202)
}

async fn wait_state(user: &TestUser, name: &str, state: &str) -> Value {
    user.wait_pod_state(name, state, WAIT).await
}

/// Creates pod `name` running `script` (which should end in `exec sleep …`), waits until it
/// runs and until `ready` exists in its volume (what the script made before it). Returns the
/// pod and its volume directory on the node.
async fn run_pod(fleet: &Fleet, user: &TestUser, name: &str, script: &str) -> (Value, std::path::PathBuf) {
    let script = format!("{script}\ntouch /data/ready\nexec sleep 100000");
    create_pod(user, name, "local", &script).await;
    let pod = wait_state(user, name, "running").await;
    let id = pod["id"].as_str().expect("id").to_string();
    let volume = fleet.nodes[0].state_dir.join("volumes").join(&id);
    eventually(WAIT, "the pod's script done", || async {
        ensure!(volume.join("ready").exists(), "no ready file yet");
        Ok(())
    })
    .await;
    (pod, volume)
}

fn enc(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

async fn get(user: &TestUser, url: &str) -> instapod_tests::client::Response {
    user.client().get(url).send().await
}

async fn read(user: &TestUser, pod: &str, path: &str) -> instapod_tests::client::Response {
    get(user, &format!("/api/pods/{pod}/files/content?path={}", enc(path))).await
}

async fn list(user: &TestUser, pod: &str, path: &str) -> instapod_tests::client::Response {
    get(user, &format!("/api/pods/{pod}/files?path={}", enc(path))).await
}

async fn put(user: &TestUser, pod: &str, body: &Value) -> instapod_tests::client::Response {
    user.client()
        .put_json(&format!("/api/pods/{pod}/files/content"), body)
        .await
}

async fn delete(user: &TestUser, pod: &str, path: &str, recursive: bool) -> instapod_tests::client::Response {
    user.client()
        .delete(&format!(
            "/api/pods/{pod}/files?path={}&recursive={recursive}",
            enc(path)
        ))
        .send()
        .await
}

const BOUNDARY: &str = "instapod-test-boundary-7d1c";

fn multipart(path: &str, extra: &[(&str, &str)], data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let mut text_part = |name: &str, value: &str| {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    };
    text_part("path", path);
    for (name, value) in extra {
        text_part(name, value);
    }
    body.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"blob\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

async fn upload(
    user: &TestUser,
    pod: &str,
    path: &str,
    extra: &[(&str, &str)],
    data: &[u8],
) -> instapod_tests::client::Response {
    user.client()
        .post(&format!("/api/pods/{pod}/files/upload"))
        .raw_body(
            &format!("multipart/form-data; boundary={BOUNDARY}"),
            multipart(path, extra, data),
        )
        .send()
        .await
}

fn names(listing: &Value) -> Vec<String> {
    listing["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["name"].as_str().expect("name").to_string())
        .collect()
}

/// Names in the volume (recursively) that are leftovers of writes.
fn leftovers(volume: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![volume.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".instapod-tmp-") {
                found.push(entry.path().display().to_string());
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    found
}

#[tokio::test]
async fn every_operation_works_on_a_running_and_a_stopped_pod() {
    let fleet = fleet().await;
    let user = scale_user(&fleet.cp).await;
    let (_pod, volume) = run_pod(
        &fleet,
        &user,
        "box",
        "mkdir -p /data/sub && echo from-pod > /data/sub/pod.txt",
    )
    .await;

    // Create a folder with parents, then without (exists: 409), and with parents again (200).
    let made = user
        .client()
        .post_json(
            "/api/pods/box/folders",
            &json!({"path": "docs/2026/notes", "parents": true}),
        )
        .await
        .json_with_status(201);
    assert_eq!(made, json!({"path": "docs/2026/notes", "created": true}));
    assert!(volume.join("docs/2026/notes").is_dir());
    user.client()
        .post_json("/api/pods/box/folders", &json!({"path": "docs/2026"}))
        .await
        .assert_error(409, "already_exists");
    let again = user
        .client()
        .post_json("/api/pods/box/folders", &json!({"path": "docs/2026", "parents": true}))
        .await
        .json_with_status(200);
    assert_eq!(again["created"], false);
    user.client()
        .post_json("/api/pods/box/folders", &json!({"path": "missing/leaf"}))
        .await
        .assert_error(404, "file_not_found");

    // Write (create), read back, replace with if-match, stale if-match, create-only.
    let created = put(&user, "box", &json!({"path": "docs/hello.txt", "content": "héllo\n"}))
        .await
        .json_with_status(201);
    assert_eq!(
        (created["size"].as_u64(), created["created"].as_bool()),
        (Some(7), Some(true))
    );
    assert_eq!(
        std::fs::read(volume.join("docs/hello.txt")).expect("on disk"),
        "héllo\n".as_bytes()
    );
    let content = read(&user, "box", "docs/hello.txt").await.json_with_status(200);
    assert_eq!(content["content"], "héllo\n");
    assert_eq!(content["encoding"], "utf-8");
    assert_eq!(content["etag"], created["etag"]);
    let etag = created["etag"].as_str().expect("etag").to_string();
    let replaced = put(
        &user,
        "box",
        &json!({"path": "docs/hello.txt", "content": "second\n", "if_match": etag}),
    )
    .await
    .json_with_status(200);
    assert_eq!(replaced["created"], false);
    assert_ne!(replaced["etag"], created["etag"]);
    let stale = put(
        &user,
        "box",
        &json!({"path": "docs/hello.txt", "content": "lost update", "if_match": etag}),
    )
    .await;
    stale.assert_error(412, "etag_mismatch");
    put(
        &user,
        "box",
        &json!({"path": "docs/hello.txt", "content": "x", "create_only": true}),
    )
    .await
    .assert_error(409, "already_exists");
    assert_eq!(
        std::fs::read_to_string(volume.join("docs/hello.txt")).expect("on disk"),
        "second\n"
    );
    put(
        &user,
        "box",
        &json!({"path": "docs/new.txt", "content": "new", "create_only": true}),
    )
    .await
    .assert_status(201);
    put(&user, "box", &json!({"path": "docs/2026", "content": "x"}))
        .await
        .assert_error(400, "not_a_regular_file");
    put(&user, "box", &json!({"path": "nowhere/x.txt", "content": "x"}))
        .await
        .assert_error(404, "file_not_found");
    put(
        &user,
        "box",
        &json!({"path": "docs/x", "content": "x", "encoding": "rot13"}),
    )
    .await
    .assert_error(400, "validation_failed");
    put(&user, "box", &json!({"path": "docs/x", "contents": "typo"}))
        .await
        .assert_error(400, "invalid_body");

    // Binary content: base64 both ways; ranges; the JSON read cap; the raw download.
    let binary: Vec<u8> = (0..=255u8).cycle().take(3 * 1024 * 1024).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&binary[..1000]);
    put(
        &user,
        "box",
        &json!({"path": "bin/small.bin", "content": b64, "encoding": "base64"}),
    )
    .await
    .assert_error(404, "file_not_found"); // no folder bin yet
    user.client()
        .post_json("/api/pods/box/folders", &json!({"path": "bin"}))
        .await
        .assert_status(201);
    put(
        &user,
        "box",
        &json!({"path": "bin/small.bin", "content": b64, "encoding": "base64"}),
    )
    .await
    .assert_status(201);
    let small = read(&user, "box", "bin/small.bin").await.json_with_status(200);
    assert_eq!(
        (small["encoding"].as_str(), small["content"].as_str()),
        (Some("base64"), Some(b64.as_str()))
    );
    let uploaded = upload(&user, "box", "bin/big.bin", &[], &binary)
        .await
        .json_with_status(201);
    assert_eq!(uploaded["size"], binary.len() as u64);
    assert_eq!(std::fs::read(volume.join("bin/big.bin")).expect("on disk"), binary);
    read(&user, "box", "bin/big.bin")
        .await
        .assert_error(413, "file_too_large");
    // Bytes 128.. are not UTF-8 on their own: base64.
    let range = get(
        &user,
        "/api/pods/box/files/content?path=bin/big.bin&offset=1000064&length=10",
    )
    .await
    .json_with_status(200);
    assert_eq!(range["encoding"], "base64");
    let expected = base64::engine::general_purpose::STANDARD.encode(&binary[1_000_064..1_000_074]);
    assert_eq!(
        (range["length"].as_u64(), range["size"].as_u64()),
        (Some(10), Some(binary.len() as u64))
    );
    assert_eq!(range["content"], expected);
    get(
        &user,
        "/api/pods/box/files/content?path=bin/big.bin&offset=0&length=2000000",
    )
    .await
    .assert_error(400, "invalid_range");
    get(&user, "/api/pods/box/files/content?path=bin/big.bin&offset=99999999")
        .await
        .assert_error(400, "invalid_range");
    let raw = user
        .client()
        .get("/api/pods/box/files/content?path=bin/big.bin")
        .header("Accept", "application/octet-stream")
        .send()
        .await;
    raw.assert_status(200);
    assert_eq!(raw.header("content-type").as_deref(), Some("application/octet-stream"));
    assert_eq!(raw.header("content-length"), Some(binary.len().to_string()));
    assert_eq!(
        raw.header("etag"),
        Some(format!("\"{}\"", uploaded["etag"].as_str().expect("etag")))
    );
    assert!(raw.body == binary, "the download is the upload");
    let raw_range = user
        .client()
        .get("/api/pods/box/files/content?path=bin/big.bin&offset=5&length=100")
        .header("Accept", "application/octet-stream")
        .send()
        .await;
    assert_eq!(raw_range.body, binary[5..105].to_vec());
    // Upload over an existing file replaces it; create-only refuses.
    upload(&user, "box", "bin/big.bin", &[("create_only", "true")], b"nope")
        .await
        .assert_error(409, "already_exists");
    let over = upload(&user, "box", "bin/big.bin", &[], b"replaced")
        .await
        .json_with_status(200);
    assert_eq!(over["size"], 8);
    user.client()
        .post("/api/pods/box/files/upload")
        .raw_body("application/json", b"{}".to_vec())
        .send()
        .await
        .assert_error(415, "unsupported_media_type");

    // A file the pod wrote is readable; the pod sees what the API wrote.
    assert_eq!(
        read(&user, "box", "sub/pod.txt").await.json_with_status(200)["content"],
        "from-pod\n"
    );

    // List: sorted, typed, paged, with usage.
    let root = list(&user, "box", "").await.json_with_status(200);
    assert_eq!(names(&root), ["bin", "docs", "ready", "sub"]);
    let docs = list(&user, "box", "docs").await.json_with_status(200);
    assert_eq!(names(&docs), ["2026", "hello.txt", "new.txt"]);
    let hello = &docs["entries"][1];
    assert_eq!(
        (hello["type"].as_str(), hello["size"].as_u64(), hello["mode"].as_str()),
        (Some("file"), Some(7), Some("0644"))
    );
    assert!(hello["mtime"].as_str().is_some_and(|t| t.ends_with('Z')), "{hello}");
    assert_eq!(docs["entries"][0]["type"], "directory");
    assert!(docs["usage"]["used_bytes"].as_u64().is_some_and(|u| u >= 8), "{docs}");
    assert!(
        docs["usage"]["limit_bytes"].as_u64().is_some_and(|u| u >= 1 << 30),
        "{docs}"
    );
    for i in 0..25 {
        std::fs::write(volume.join(format!("sub/f{i:02}")), b"x").expect("file");
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _page in 0..10 {
        let url = match &cursor {
            None => "/api/pods/box/files?path=sub&limit=10".to_string(),
            Some(c) => format!("/api/pods/box/files?path=sub&limit=10&cursor={}", enc(c)),
        };
        let page = get(&user, &url).await.json_with_status(200);
        seen.extend(names(&page));
        cursor = page["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }
    let mut expected: Vec<String> = (0..25).map(|i| format!("f{i:02}")).collect();
    expected.push("pod.txt".into());
    assert_eq!(seen, expected);
    get(&user, "/api/pods/box/files?limit=0")
        .await
        .assert_error(400, "validation_failed");
    get(&user, "/api/pods/box/files?limit=10001")
        .await
        .assert_error(400, "validation_failed");
    get(&user, "/api/pods/box/files?path=docs&bogus=1")
        .await
        .assert_error(400, "validation_failed");
    list(&user, "box", "docs/hello.txt")
        .await
        .assert_error(400, "not_a_directory");
    list(&user, "box", "nope").await.assert_error(404, "file_not_found");

    // Delete: a file, an empty folder, a non-empty folder (409, then recursive), not the root.
    delete(&user, "box", "docs/new.txt", false).await.assert_status(200);
    assert!(!volume.join("docs/new.txt").exists());
    delete(&user, "box", "docs", false)
        .await
        .assert_error(409, "directory_not_empty");
    delete(&user, "box", "docs/2026/notes", false).await.assert_status(200);
    delete(&user, "box", "docs", true).await.assert_status(200);
    assert!(!volume.join("docs").exists());
    delete(&user, "box", "", true)
        .await
        .assert_error(400, "cannot_delete_root");
    delete(&user, "box", ".", true)
        .await
        .assert_error(400, "cannot_delete_root");
    delete(&user, "box", "docs", false)
        .await
        .assert_error(404, "file_not_found");
    assert!(volume.is_dir());

    // Tenancy: another team's pod is a 404 for every operation, and nothing changes.
    let stranger = scale_user(&fleet.cp).await;
    for response in [
        list(&stranger, "box", "").await,
        read(&stranger, "box", "sub/pod.txt").await,
        put(&stranger, "box", &json!({"path": "sub/pod.txt", "content": "owned"})).await,
        upload(&stranger, "box", "sub/pod.txt", &[], b"owned").await,
        delete(&stranger, "box", "sub", true).await,
        stranger
            .client()
            .post_json("/api/pods/box/folders", &json!({"path": "owned"}))
            .await,
    ] {
        response.assert_error(404, "not_found");
    }
    assert_eq!(
        std::fs::read_to_string(volume.join("sub/pod.txt")).expect("kept"),
        "from-pod\n"
    );
    assert!(!volume.join("owned").exists());
    user.client().get("/api/pods/box/files").send().await.assert_status(200);
    fleet
        .cp
        .client()
        .get("/api/pods/box/files")
        .send()
        .await
        .assert_error(401, "unauthorized");

    // A pod that has no node yet: 409.
    create_pod(&user, "nowhere", "us-east", "exec sleep 100000").await;
    list(&user, "nowhere", "").await.assert_error(409, "pod_not_placed");

    // Stopped: the volume is still there and served.
    user.client().post("/api/pods/box/stop").send().await.assert_status(202);
    wait_state(&user, "box", "stopped").await;
    put(&user, "box", &json!({"path": "while-stopped.txt", "content": "zzz"}))
        .await
        .assert_status(201);
    assert_eq!(
        read(&user, "box", "while-stopped.txt").await.json_with_status(200)["content"],
        "zzz"
    );
    assert!(names(&list(&user, "box", "").await.json_with_status(200)).contains(&"while-stopped.txt".to_string()));
    assert!(leftovers(&volume).is_empty(), "{:?}", leftovers(&volume));
}

#[tokio::test]
async fn nothing_outside_the_volume_is_reached() {
    let fleet = fleet().await;
    let user = scale_user(&fleet.cp).await;
    // A victim on the node, outside every volume.
    let victim_dir = std::env::temp_dir().join(format!("instapod-files-victim-{}", ids::random_suffix()));
    std::fs::create_dir_all(&victim_dir).expect("victim dir");
    std::fs::write(victim_dir.join("secret.txt"), b"host secret").expect("victim");
    let victim = victim_dir.display().to_string();
    // Symlinks planted by the pod: to `/`, to the node's victim by absolute path, a magic
    // link, one that climbs, one that stays inside; a FIFO. Then a loop that keeps swapping
    // `swap` between a directory inside the volume and a link to `/`.
    let script = format!(
        "mkdir -p /data/sub /data/real/etc /data/real{victim} && echo hello > /data/sub/hello.txt && \
         echo inside > /data/real/etc/hostname && echo inside > /data/real{victim}/secret.txt && \
         ln -s / /data/escape && ln -s {victim} /data/victim && ln -s /proc/self/root /data/magic && \
         ln -s ../../../../../../../.. /data/sub/up && ln -s sub/hello.txt /data/inside && \
         mkfifo /data/fifo && \
         (i=0; while [ $i -lt 2000000 ]; do ln -sfn real /data/swap; rm -f /data/swap; ln -s / /data/swap; rm -f /data/swap; i=$((i+1)); done) &"
    );
    let (_pod, volume) = run_pod(&fleet, &user, "jail", &script).await;
    // A device file, made on the node (the pod has no CAP_MKNOD to rely on).
    let made = std::process::Command::new("mknod")
        .arg(volume.join("null"))
        .args(["c", "1", "3"])
        .status()
        .expect("run mknod");
    assert!(made.success(), "mknod");

    // Hostile path strings: 400 invalid_path before anything is touched.
    for raw in [
        "../etc/passwd",
        "%2e%2e%2fetc%2fpasswd",
        "%2E%2E/%2E%2E/etc/passwd",
        "sub/../../etc/passwd",
        "/etc/passwd",
        "%2fetc%2fpasswd",
        "sub%00.txt",
        "..%5c..%5cetc%5cpasswd",
        "sub%5chello.txt",
    ] {
        for url in [
            format!("/api/pods/jail/files/content?path={raw}"),
            format!("/api/pods/jail/files?path={raw}"),
        ] {
            get(&user, &url).await.assert_error(400, "invalid_path");
        }
        user.client()
            .delete(&format!("/api/pods/jail/files?path={raw}"))
            .send()
            .await
            .assert_error(400, "invalid_path");
    }
    for path in ["../escape.txt", "/tmp/escape.txt", "a\0b", "..\\x"] {
        put(&user, "jail", &json!({"path": path, "content": "x"}))
            .await
            .assert_error(400, "invalid_path");
        upload(&user, "jail", path, &[], b"x")
            .await
            .assert_error(400, "invalid_path");
        user.client()
            .post_json("/api/pods/jail/folders", &json!({"path": path, "parents": true}))
            .await
            .assert_error(400, "invalid_path");
    }
    // Double-encoded: a harmless name inside the volume.
    get(&user, "/api/pods/jail/files/content?path=%252e%252e%252fetc%252fpasswd")
        .await
        .assert_error(404, "file_not_found");

    // Planted symlinks: nothing read, listed, written, created or deleted through them.
    let secret = format!("{}/secret.txt", victim.trim_start_matches('/'));
    for through in [
        "escape/etc/passwd".to_string(),
        format!("escape/{secret}"),
        "victim/secret.txt".to_string(),
        "magic/etc/passwd".to_string(),
        "sub/up/etc/passwd".to_string(),
    ] {
        read(&user, "jail", &through)
            .await
            .assert_error(400, "path_outside_volume");
        let raw = user
            .client()
            .get(&format!("/api/pods/jail/files/content?path={}", enc(&through)))
            .header("Accept", "application/octet-stream")
            .send()
            .await;
        raw.assert_error(400, "path_outside_volume");
    }
    for dir in ["escape", "escape/etc", "victim", "magic", "sub/up"] {
        list(&user, "jail", dir).await.assert_error(400, "path_outside_volume");
    }
    read(&user, "jail", "escape")
        .await
        .assert_error(400, "path_outside_volume");
    let planted = format!("{victim}/planted.txt");
    put(&user, "jail", &json!({"path": "victim/planted.txt", "content": "x"}))
        .await
        .assert_error(400, "path_outside_volume");
    put(
        &user,
        "jail",
        &json!({"path": format!("escape{planted}"), "content": "x"}),
    )
    .await
    .assert_error(400, "path_outside_volume");
    upload(&user, "jail", "victim/planted.txt", &[], b"x")
        .await
        .assert_error(400, "path_outside_volume");
    user.client()
        .post_json(
            "/api/pods/jail/folders",
            &json!({"path": "victim/newdir", "parents": true}),
        )
        .await
        .assert_error(400, "path_outside_volume");
    user.client()
        .post_json("/api/pods/jail/folders", &json!({"path": "victim/newdir"}))
        .await
        .assert_error(400, "path_outside_volume");
    delete(&user, "jail", "victim/secret.txt", false)
        .await
        .assert_error(400, "path_outside_volume");
    delete(&user, "jail", &format!("escape/{secret}"), true)
        .await
        .assert_error(400, "path_outside_volume");
    assert!(!std::path::Path::new(&planted).exists(), "nothing written outside");
    assert!(!victim_dir.join("newdir").exists(), "no folder made outside");
    assert_eq!(
        std::fs::read(victim_dir.join("secret.txt")).expect("still there"),
        b"host secret"
    );
    // A symlink that stays inside is followed; the list shows symlinks as symlinks.
    assert_eq!(
        read(&user, "jail", "inside").await.json_with_status(200)["content"],
        "hello\n"
    );
    let root = list(&user, "jail", "").await.json_with_status(200);
    let kind_of = |name: &str| {
        root["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["type"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(kind_of("escape").as_deref(), Some("symlink"));
    assert_eq!(kind_of("fifo").as_deref(), Some("fifo"));
    assert_eq!(kind_of("null").as_deref(), Some("char_device"));
    // Writing at a symlink's own path replaces the link, never writes through it; deleting a
    // link removes the link only.
    put(&user, "jail", &json!({"path": "victim", "content": "now a file"}))
        .await
        .assert_status(200);
    assert!(!volume.join("victim").is_symlink());
    assert_eq!(
        std::fs::read(victim_dir.join("secret.txt")).expect("still there"),
        b"host secret"
    );
    delete(&user, "jail", "escape", true).await.assert_status(200);
    assert!(std::path::Path::new("/etc/passwd").exists());
    assert!(!volume.join("escape").exists());

    // FIFOs and devices are refused without being opened (a FIFO would block the reader).
    for special in ["fifo", "null"] {
        let answered = tokio::time::timeout(Duration::from_secs(10), read(&user, "jail", special))
            .await
            .expect("answered at once");
        answered.assert_error(400, "not_a_regular_file");
        let raw = user
            .client()
            .get(&format!("/api/pods/jail/files/content?path={special}"))
            .header("Accept", "application/octet-stream")
            .send()
            .await;
        raw.assert_error(400, "not_a_regular_file");
    }

    // The swapped symlink: whatever the moment, `swap/...` is the volume's file or refused,
    // never the node's.
    let host_hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let mut inside_reads = 0;
    let mut refused = 0;
    for round in 0..300 {
        let answer = read(&user, "jail", &format!("swap/{secret}")).await;
        match answer.status {
            200 => {
                assert_eq!(answer.json()["content"], "inside\n", "round {round}");
                inside_reads += 1;
            }
            400 => {
                answer.assert_error(400, "path_outside_volume");
                refused += 1;
            }
            404 => {
                answer.assert_error(404, "file_not_found");
            }
            other => panic!("round {round}: {other} {}", answer.text()),
        }
        let listed = list(&user, "jail", "swap/etc").await;
        if listed.status == 200 {
            let listed = names(&listed.json());
            assert!(!listed.contains(&"passwd".to_string()), "round {round}: {listed:?}");
        }
        let hostname = read(&user, "jail", "swap/etc/hostname").await;
        if hostname.status == 200 {
            let content = hostname.json()["content"].as_str().unwrap_or_default().to_string();
            assert_eq!(content, "inside\n", "round {round}");
            assert!(host_hostname.is_empty() || content != host_hostname);
        }
        let wrote = put(
            &user,
            "jail",
            &json!({"path": format!("swap/{victim}/planted.txt").replace("//", "/"), "content": "x"}),
        )
        .await;
        assert!(
            [200, 201, 400, 404].contains(&wrote.status),
            "round {round}: {}",
            wrote.text()
        );
        let deleted = delete(&user, "jail", &format!("swap/{secret}"), false).await;
        assert!(
            [200, 400, 404].contains(&deleted.status),
            "round {round}: {}",
            deleted.text()
        );
        if deleted.status == 200 {
            std::fs::write(volume.join(format!("real{victim}/secret.txt")), b"inside\n").expect("restore");
        }
        let made = user
            .client()
            .post_json("/api/pods/jail/folders", &json!({"path": "swap/etc/newdir"}))
            .await;
        assert!(
            [201, 400, 404, 409].contains(&made.status),
            "round {round}: {}",
            made.text()
        );
    }
    assert!(!std::path::Path::new(&planted).exists(), "nothing written outside");
    assert!(!std::path::Path::new("/etc/newdir").exists(), "no folder made outside");
    assert_eq!(
        std::fs::read(victim_dir.join("secret.txt")).expect("still there"),
        b"host secret"
    );
    assert!(inside_reads > 0 || refused > 0, "the race was exercised");
    eprintln!("swap rounds: {inside_reads} read inside, {refused} refused");
    std::fs::remove_dir_all(&victim_dir).ok();
}

#[tokio::test]
async fn quota_request_cap_and_concurrent_writers() {
    let fleet = fleet().await;
    let user = scale_user(&fleet.cp).await;
    let (_pod, volume) = run_pod(&fleet, &user, "full", "mkdir -p /data/dir").await;

    // Fill the volume to 1 MiB under the pod's disk (a sparse file counts with its apparent
    // size); the delete makes the agent measure the volume again.
    let listing = list(&user, "full", "").await.json_with_status(200);
    let limit = listing["usage"]["limit_bytes"].as_u64().expect("limit");
    assert_eq!(limit, 5 * 1024 * 1024 * 1024, "the starter plan's disk: {listing}");
    let big = std::fs::File::create(volume.join("big")).expect("big");
    big.set_len(limit - 1024 * 1024).expect("sparse size");
    drop(big);
    delete(&user, "full", "ready", false).await.assert_status(200);
    let listing = list(&user, "full", "").await.json_with_status(200);
    assert_eq!(
        listing["usage"]["used_bytes"].as_u64(),
        Some(limit - 1024 * 1024),
        "{listing}"
    );

    let two_mib = vec![7u8; 2 * 1024 * 1024];
    upload(&user, "full", "dir/over.bin", &[], &two_mib)
        .await
        .assert_error(507, "disk_quota_exceeded");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&two_mib);
    put(
        &user,
        "full",
        &json!({"path": "dir/over2.bin", "content": b64, "encoding": "base64"}),
    )
    .await
    .assert_error(507, "disk_quota_exceeded");
    assert_eq!(
        names(&list(&user, "full", "dir").await.json_with_status(200)),
        Vec::<String>::new()
    );
    assert!(leftovers(&volume).is_empty(), "{:?}", leftovers(&volume));
    // What fits still goes in.
    upload(&user, "full", "dir/fits.bin", &[], &vec![1u8; 512 * 1024])
        .await
        .assert_status(201);

    // The request cap: 413 whether the client declares the length or streams it.
    let too_big = vec![9u8; UPLOAD_CAP as usize + 1024 * 1024];
    upload(&user, "full", "dir/capped.bin", &[], &too_big)
        .await
        .assert_error(413, "payload_too_large");
    let body = multipart("dir/capped2.bin", &[], &too_big);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let streamed = instapod_tests::http_builder()
        .build()
        .expect("client")
        .post(format!("{}/api/pods/full/files/upload", fleet.cp.url()))
        .bearer_auth(&user.token)
        .header("Content-Type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await;
    let streamed = streamed.expect("the client receives the answer");
    assert_eq!(streamed.status().as_u16(), 413);
    let body: Value = streamed.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "payload_too_large");
    eventually(Duration::from_secs(10), "no partial upload", || async {
        let names = names(&list(&user, "full", "dir").await.json_with_status(200));
        ensure!(names == ["fits.bin"], "{names:?}");
        ensure!(leftovers(&volume).is_empty(), "{:?}", leftovers(&volume));
        Ok(())
    })
    .await;
    delete(&user, "full", "big", false).await.assert_status(200);
    upload(&user, "full", "dir/now.bin", &[], &two_mib)
        .await
        .assert_status(201);

    // Concurrent writers and readers: the file is always exactly one of the writes.
    let size = 512 * 1024;
    let contents: Vec<String> = (0..8u8)
        .map(|i| char::from(b'a' + i).to_string().repeat(size))
        .collect();
    put(
        &user,
        "full",
        &json!({"path": "dir/shared.txt", "content": contents[0]}),
    )
    .await
    .assert_status(201);
    let mut writers = Vec::new();
    for _round in 0..3 {
        for content in &contents {
            let client = user.client();
            let content = content.clone();
            writers.push(tokio::spawn(async move {
                client
                    .put_json(
                        "/api/pods/full/files/content",
                        &json!({"path": "dir/shared.txt", "content": content}),
                    )
                    .await
                    .status
            }));
        }
    }
    let mut readers = Vec::new();
    for _ in 0..4 {
        let client = user.client();
        let contents = contents.clone();
        readers.push(tokio::spawn(async move {
            for _ in 0..15 {
                let raw = client
                    .get("/api/pods/full/files/content?path=dir/shared.txt")
                    .header("Accept", "application/octet-stream")
                    .send()
                    .await;
                assert_eq!(raw.status, 200, "{}", raw.text());
                assert!(
                    contents.iter().any(|c| c.as_bytes() == raw.body.as_slice()),
                    "a torn read"
                );
            }
        }));
    }
    for writer in writers {
        assert_eq!(writer.await.expect("writer"), 200);
    }
    for reader in readers {
        reader.await.expect("reader");
    }
    let last = std::fs::read_to_string(volume.join("dir/shared.txt")).expect("on disk");
    assert!(contents.contains(&last), "the file is one of the writes");
    assert!(leftovers(&volume).is_empty(), "{:?}", leftovers(&volume));
}
