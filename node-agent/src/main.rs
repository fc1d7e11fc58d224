//! `instapod-node-agent`: runs the agent (`run`, the default) or imports an OCI image tarball
//! into containerd for air-gapped nodes (`import-image <file.tar> <name>`).

fn main() -> std::process::ExitCode {
    instapod_node_agent::cli::main()
}
