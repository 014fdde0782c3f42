//! Interop with clients loopvol did not write. A real Python `grpcio` (gRPC C-core, from PyPI,
//! pinned in tests/interop/requirements.txt) drives the real binary through create → stage →
//! publish → write/read → stats → unpublish → unstage → delete with its default channel
//! options: on a unix socket that means a percent-encoded socket path as `:authority`, which
//! hyper/h2 servers used to reset.
//!
//! The Python comes from `LOOPVOL_PYTHON` (scripts/test points it at a venv it builds), else
//! `python3`. Without grpcio the test skips, unless CI=true or LOOPVOL_REQUIRE_INTEROP=1.

mod common;

use std::process::Command;

use common::*;

fn python() -> String {
    std::env::var("LOOPVOL_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Whether the Python at hand has grpcio and grpcio-tools; if not, skip or fail as required.
fn grpcio_or_skip(test: &str) -> bool {
    let ok = Command::new(python())
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    let required = std::env::var("LOOPVOL_REQUIRE_INTEROP").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true");
    let hint = "run scripts/test, or pip install -r tests/interop/requirements.txt";
    if required {
        panic!("{test}: {} has no grpcio ({hint})", python());
    }
    eprintln!("SKIP {test}: {} has no grpcio ({hint})", python());
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_client_with_default_options_drives_a_whole_volume_lifecycle() {
    if !root_or_skip("grpcio_lifecycle") || !grpcio_or_skip("grpcio_lifecycle") {
        return;
    }
    let d = Driver::start().await;
    let work = d.path("grpcio");
    std::fs::create_dir_all(&work).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/interop/grpcio_client.py"
    );
    let out = tokio::task::spawn_blocking({
        let (socket, work) = (d.socket.clone(), work.clone());
        move || {
            Command::new(python())
                .arg(script)
                .arg(&socket)
                .arg(&work)
                .output()
                .expect("run the grpcio client")
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcio client failed ({}):\n{stdout}\n{}\ndriver log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    for step in [
        "ok GetPluginInfo",
        "ok CreateVolume(no name) INVALID_ARGUMENT",
        "ok NodeStageVolume",
        "ok NodePublishVolume",
        "ok write+read through the published volume",
        "ok NodeUnstageVolume",
        "ok DeleteVolume",
        "grpcio interop: all steps passed",
    ] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
    d.assert_clean();
}
