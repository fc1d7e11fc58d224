//! Checks of the node-agent test harness, with real processes: the private containerd answers
//! on its own socket, a busybox image built by the tests is pushed to the private registry and
//! served back, containerd pulls it from there over plain HTTP and runs it with runc, and the
//! OCI layout tarball of the same image imports and runs too.
//!
//! `ctr` is used here because this file tests the machine and the harness; the node agent
//! itself talks to containerd over gRPC.

use std::process::{Command, Output};

use instapod_tests::containerd::{self, TEST_NAMESPACE};
use instapod_tests::images::{ImageBuilder, MANIFEST_MEDIA_TYPE};
use instapod_tests::{ids, process, registry};

/// Runs `command`, panicking with its output and containerd's log unless it succeeds.
fn run_ok(mut command: Command, what: &str) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run `ctr` for {what}: {err}"));
    if !output.status.success() {
        panic!(
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}\ncontainerd log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            containerd::shared().log_tail()
        );
    }
    output
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A container id no other test (or earlier run) uses.
fn unique_container_id(label: &str) -> String {
    format!("{label}-{}", ids::random_suffix())
}

/// The image the run tests use: its default command prints a variable from the image's env.
fn greeting_image() -> ImageBuilder {
    ImageBuilder::busybox()
        .env("GREETING", "hello from the image config")
        .cmd(["sh", "-c", "echo \"$GREETING\"; cat /etc/motd"])
        .file("/etc/motd", "a file added by the test\n", 0o644)
}

#[test]
fn private_containerd_answers_on_its_own_socket() {
    let containerd = containerd::shared();
    assert_ne!(
        containerd.socket(),
        std::path::Path::new("/run/containerd/containerd.sock"),
        "tests must never use the system containerd"
    );
    let mut version = containerd.ctr(TEST_NAMESPACE);
    version.arg("version");
    let output = stdout_of(&run_ok(version, "ctr version"));
    let server = output
        .split("Server:")
        .nth(1)
        .unwrap_or_else(|| panic!("`ctr version` printed no server part:\n{output}"));
    assert!(server.contains("Version:"), "no server version in:\n{output}");
    assert!(server.contains("UUID:"), "no server UUID in:\n{output}");
}

#[tokio::test]
async fn registry_serves_a_pushed_image_back() {
    let registry = registry::shared();
    let image = greeting_image().build();
    let repository = format!("push-{}", ids::random_suffix());
    image
        .push(&registry.base_url(), &repository, "1")
        .await
        .unwrap_or_else(|err| panic!("push failed: {err:#}\nregistry log:\n{}", registry.log_tail()));

    // An independent look at what the registry stores, beyond push's own check.
    let http = instapod_tests::http_builder().build().expect("http client");
    let url = format!("{}/v2/{repository}/manifests/1", registry.base_url());
    let response = http
        .get(&url)
        .header("Accept", MANIFEST_MEDIA_TYPE)
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().expect("ASCII header"),
        MANIFEST_MEDIA_TYPE
    );
    let manifest: serde_json::Value = response.json().await.expect("a JSON manifest");
    assert_eq!(manifest["layers"][0]["digest"], image.layer.digest.as_str());
    assert_eq!(manifest["config"]["digest"], image.config.digest.as_str());

    let url = format!("{}/v2/{repository}/blobs/{}", registry.base_url(), image.config.digest);
    let config = http.get(&url).send().await.expect("GET config blob");
    assert_eq!(config.status(), 200);
    assert_eq!(config.bytes().await.expect("config body").as_ref(), image.config.bytes);

    // Building again gives the same bytes, so parallel tests can push the same image.
    assert_eq!(greeting_image().build().manifest.digest, image.manifest.digest);
}

#[tokio::test]
async fn containerd_pulls_from_the_private_registry_and_runs_the_image() {
    let containerd = containerd::shared();
    let registry = registry::shared();
    greeting_image()
        .build()
        .push(&registry.base_url(), "busybox", "1")
        .await
        .unwrap_or_else(|err| panic!("push failed: {err:#}\nregistry log:\n{}", registry.log_tail()));
    let reference = format!("{}/busybox:1", registry.host());

    let mut pull = containerd.ctr(TEST_NAMESPACE);
    pull.args(["images", "pull", "--plain-http", &reference]);
    run_ok(pull, "ctr images pull");

    let mut run = containerd.ctr(TEST_NAMESPACE);
    run.args(["run", "--rm", &reference, &unique_container_id("echo")])
        .args(["busybox", "echo", "hello"]);
    assert_eq!(stdout_of(&run_ok(run, "ctr run busybox echo hello")), "hello\n");

    // Without arguments the image's own command and environment apply.
    let mut run = containerd.ctr(TEST_NAMESPACE);
    run.args(["run", "--rm", &reference, &unique_container_id("default")]);
    assert_eq!(
        stdout_of(&run_ok(run, "ctr run with the image's command")),
        "hello from the image config\na file added by the test\n"
    );
}

#[test]
fn an_oci_layout_tarball_imports_and_runs() {
    let containerd = containerd::shared();
    let image = greeting_image().build();
    let tarball = process::temp_dir("oci-layout").join("image.tar");
    let name = format!("instapod.test/import-{}:1", ids::random_suffix());
    image
        .write_oci_layout(&tarball, &name)
        .unwrap_or_else(|err| panic!("cannot write the OCI layout: {err:#}"));

    let mut import = containerd.ctr(TEST_NAMESPACE);
    import.args(["images", "import"]).arg(&tarball);
    run_ok(import, "ctr images import");

    let mut list = containerd.ctr(TEST_NAMESPACE);
    list.args(["images", "list", "--quiet"]);
    let names = stdout_of(&run_ok(list, "ctr images list"));
    assert!(names.lines().any(|line| line == name), "{name} not among:\n{names}");

    let mut run = containerd.ctr(TEST_NAMESPACE);
    run.args(["run", "--rm", &name, &unique_container_id("import")])
        .args(["sh", "-c", "echo imported"]);
    assert_eq!(stdout_of(&run_ok(run, "ctr run of the imported image")), "imported\n");
}
