//! The node agent's containerd runtime against the harness's private containerd: it connects
//! over gRPC, reads the server's version, and its requests are scoped to its namespace (an
//! image imported into one namespace is listed there and nowhere else).

use instapod_node_agent::runtime::{Runtime, RuntimeError};
use instapod_tests::images::ImageBuilder;
use instapod_tests::{containerd, ids, process};

#[tokio::test]
async fn runtime_reads_the_version_of_the_private_containerd() {
    let containerd = containerd::shared();
    let runtime = Runtime::connect(containerd.socket(), "instapod-test")
        .await
        .unwrap_or_else(|err| panic!("connect failed: {err}\ncontainerd log:\n{}", containerd.log_tail()));
    assert_eq!(runtime.namespace(), "instapod-test");
    let version = runtime.version().await.expect("Version answers");
    // The version `ctr version` prints for the server must be the one the agent reads.
    let output = containerd
        .ctr("instapod-test")
        .arg("version")
        .output()
        .expect("running ctr version");
    assert!(output.status.success(), "ctr version failed");
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    let server_part = printed.split("Server:").nth(1).expect("ctr prints a server part");
    assert!(!version.version.is_empty());
    assert!(
        server_part.contains(&format!("Version:  {}", version.version)),
        "{version:?} vs\n{printed}"
    );
    assert!(server_part.contains(&version.revision), "{version:?} vs\n{printed}");
}

#[tokio::test]
async fn requests_are_scoped_to_the_runtimes_namespace() {
    let containerd = containerd::shared();
    let namespace = format!("ns-{}", ids::random_suffix());
    let other = format!("other-{}", ids::random_suffix());
    let name = format!("instapod.test/scoped-{}:1", ids::random_suffix());
    let tarball = process::temp_dir("scoped").join("image.tar");
    ImageBuilder::busybox()
        .build()
        .write_oci_layout(&tarball, &name)
        .expect("writing the OCI layout");
    let output = containerd
        .ctr(&namespace)
        .args(["images", "import"])
        .arg(&tarball)
        .output()
        .expect("running ctr images import");
    assert!(
        output.status.success(),
        "ctr images import failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let runtime = Runtime::connect(containerd.socket(), &namespace)
        .await
        .expect("connect");
    assert_eq!(runtime.image_names().await.expect("Images.List"), vec![name.clone()]);
    let elsewhere = Runtime::connect(containerd.socket(), &other).await.expect("connect");
    assert_eq!(
        elsewhere.image_names().await.expect("Images.List"),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn a_stopped_containerd_is_a_transient_error() {
    // A dedicated daemon, so stopping it does not disturb the other tests.
    let containerd = containerd::Containerd::start();
    let runtime = Runtime::connect(containerd.socket(), "instapod-test")
        .await
        .expect("connect");
    runtime.version().await.expect("Version answers while it runs");
    containerd.stop();
    let err = runtime
        .version()
        .await
        .expect_err("Version must fail once containerd is gone");
    assert!(err.is_transient(), "{err:?}");
    assert!(matches!(err, RuntimeError::Unavailable { .. }), "{err:?}");

    let err = Runtime::connect(containerd.socket(), "instapod-test")
        .await
        .expect_err("nobody listens on the socket any more");
    assert!(matches!(err, RuntimeError::Connect { .. }), "{err:?}");
}
