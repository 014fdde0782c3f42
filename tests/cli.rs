//! The CLI as an operator meets it: every flag explained, sizes parsed as Kubernetes quantities
//! (and refused clearly), errors as one clean line without a backtrace, aligned and
//! machine-readable lists, RFC 3339 times, df-consistent usage, a second `serve` on a busy
//! socket refused before it touches anything, and the CSI client's clone, restore,
//! list-snapshots, get-capacity and expand reports.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use clap::CommandFactory;
use common::*;

fn loopvol(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn missing_help(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
    if cmd.is_hide_set() {
        return;
    }
    for a in cmd.get_arguments() {
        let id = a.get_id().as_str();
        if id == "help" || id == "version" || a.is_hide_set() {
            continue;
        }
        if a.get_help().is_none() && a.get_long_help().is_none() {
            out.push(format!("{path} {id}"));
        }
    }
    for sub in cmd.get_subcommands() {
        missing_help(sub, &format!("{path} {}", sub.get_name()), out);
    }
}

#[test]
fn every_flag_has_help_text() {
    let mut missing = Vec::new();
    missing_help(&loopvol::cli::Cli::command(), "loopvol", &mut missing);
    assert!(
        missing.is_empty(),
        "flags without help:\n{}",
        missing.join("\n")
    );
}

fn pool_args(dir: &Path) -> Vec<String> {
    vec![
        "--pool-dir".into(),
        dir.join("pool").to_string_lossy().into_owned(),
        "--node-id".into(),
        "cli-node".into(),
    ]
}

fn run_in(dir: &Path, args: &[&str]) -> Output {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend(pool_args(dir));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    loopvol(&refs)
}

#[test]
fn sizes_are_kubernetes_quantities_and_zero_or_units_like_gb_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let ok = run_in(
        t.path(),
        &["volume", "create", "--name", "half", "--size", "1.5Gi"],
    );
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains(&format!("storage: \"{}\"", 3u64 << 29)));
    for (size, says) in [
        ("0", "a size of 0 is not a volume"),
        (
            "10GB",
            "write 10G (powers of 1000) or 10Gi (powers of 1024)",
        ),
        ("1.5", "1.5"),
        ("-1Gi", "-1Gi"),
    ] {
        let flag = format!("--size={size}");
        let bad = run_in(t.path(), &["volume", "create", "--name", "bad", &flag]);
        assert!(!bad.status.success(), "--size {size} accepted");
        assert!(
            text(&bad.stderr).contains(says),
            "--size {size}: {}",
            text(&bad.stderr)
        );
    }
    // 10G is a quantity (decimal): accepted as exactly 10^10 bytes.
    assert_eq!(loopvol::cli::parse_size("10G").unwrap(), 10_000_000_000);
    assert_eq!(loopvol::cli::parse_size("1e3").unwrap(), 1000);
}

#[test]
fn a_minimum_size_is_announced_not_applied_silently() {
    let t = tempfile::tempdir().unwrap();
    let out = run_in(
        t.path(),
        &["volume", "create", "--name", "tiny", "--size", "5Mi"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("note: asked for 5.0 MiB"), "{err}");
    assert!(err.contains("minimum size or alignment applies"), "{err}");
}

#[test]
fn errors_are_one_line_without_a_backtrace_even_with_rust_backtrace() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("pool/volumes")).unwrap();
    let id = "vol-00000000000000000000@cli-node";
    let out = run_in(t.path(), &["volume", "inspect", id]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.starts_with("error: volume vol-0"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
}

#[test]
fn volume_list_aligns_columns_with_human_sizes_and_prints_json_yaml_wide() {
    let t = tempfile::tempdir().unwrap();
    for (name, size) in [("a", "1Gi"), ("a-much-longer-name", "512Mi")] {
        let o = run_in(
            t.path(),
            &["volume", "create", "--name", name, "--size", size],
        );
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
    let out = run_in(t.path(), &["volume", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    let col = lines[0].find("SIZE").unwrap();
    for l in &lines[1..] {
        let cell = &l[col..];
        assert!(
            cell.starts_with("1.0 GiB") || cell.starts_with("512.0 MiB"),
            "{table}"
        );
    }
    let name_col = lines[0].find("NAME").unwrap();
    assert!(
        lines
            .iter()
            .skip(1)
            .all(|l| !l[name_col..].starts_with(' ')),
        "{table}"
    );

    let json = run_in(t.path(), &["volume", "list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let vols = v["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2);
    assert!(vols.iter().any(|v| v["size_bytes"] == 1u64 << 30));
    assert!(vols[0]["created"].as_str().unwrap().ends_with('Z'));

    let yaml = text(&run_in(t.path(), &["volume", "list", "--output", "yaml"]).stdout);
    assert!(
        yaml.starts_with("volumes:") && yaml.contains("name: a-much-longer-name"),
        "{yaml}"
    );

    let wide = text(&run_in(t.path(), &["volume", "list", "-o", "wide"]).stdout);
    assert!(wide.lines().next().unwrap().contains("CREATED"), "{wide}");
    assert!(
        wide.contains("0 B"),
        "thin volumes occupy nothing yet: {wide}"
    );
}

#[test]
fn inspect_prints_rfc3339_times() {
    let t = tempfile::tempdir().unwrap();
    let o = run_in(
        t.path(),
        &["volume", "create", "--name", "when", "--size", "1Gi"],
    );
    let pv = text(&o.stdout);
    let id = pv
        .lines()
        .find_map(|l| l.trim().strip_prefix("volumeHandle: "))
        .unwrap()
        .to_string();
    let out = text(&run_in(t.path(), &["volume", "inspect", &id]).stdout);
    let created = out
        .lines()
        .find_map(|l| l.strip_prefix("created"))
        .unwrap()
        .trim();
    assert!(
        created.len() == 20 && created.as_bytes()[10] == b'T' && created.ends_with('Z'),
        "{out}"
    );
    assert!(!out.contains("unix time"), "{out}");
}

#[test]
fn status_counts_used_space_as_df_does() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("pool/volumes")).unwrap();
    let pool = t.path().join("pool");
    let out = loopvol(&["status", "-o", "json", "--pool-dir", pool.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let used = v["capacity"]["used_bytes"].as_u64().unwrap();
    let st = nix::sys::statvfs::statvfs(t.path()).unwrap();
    let f = st.fragment_size() as u64;
    let df_used = (st.blocks() as u64 - st.blocks_free() as u64) * f;
    let with_reserved = (st.blocks() as u64 - st.blocks_available() as u64) * f;
    // Other tests write meanwhile: compare within 64 MiB, and only claim the difference where
    // the filesystem really reserves blocks (ext4's 5 %).
    assert!(
        used.abs_diff(df_used) < 64 << 20,
        "used {used}, df {df_used}"
    );
    if with_reserved - df_used > 256 << 20 {
        assert!(
            used.abs_diff(with_reserved) > 128 << 20,
            "reserved blocks counted as used"
        );
    }
}

fn csi(d: &Driver, args: &[&str]) -> Output {
    let ep = format!("unix://{}", d.socket.display());
    let mut all = vec!["csi", "--endpoint", ep.as_str()];
    all.extend_from_slice(args);
    loopvol(&all)
}

fn json_of(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_a_busy_socket_changes_nothing_and_serve_says_what_next() {
    if !root_or_skip("a_second_serve_on_a_busy_socket_changes_nothing") {
        return;
    }
    let d = Driver::start().await;
    // The hint's commands work as printed: this binary (not in PATH here, so by its path),
    // this socket and this pool.
    let log = d.log();
    let ready = log
        .lines()
        .find(|l| l.contains("ready; next: `"))
        .unwrap_or_else(|| panic!("no hint in:\n{log}"));
    let hinted: Vec<&str> = ready.split('`').skip(1).step_by(2).collect();
    assert_eq!(hinted.len(), 3, "{ready}");
    assert!(
        hinted[0].starts_with(env!("CARGO_BIN_EXE_loopvol")),
        "{ready}"
    );
    assert!(hinted[2].contains(&*d.pool.to_string_lossy()), "{ready}");
    for cmd in [hinted[0], hinted[2]] {
        let argv: Vec<&str> = cmd.split_whitespace().collect();
        let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
        assert!(out.status.success(), "`{cmd}`: {}", text(&out.stderr));
    }
    let other_pool = d.path("other-pool");
    let ep = format!("unix://{}", d.socket.display());
    let out = loopvol(&[
        "serve",
        "--endpoint",
        &ep,
        "--pool-dir",
        other_pool.to_str().unwrap(),
        "--node-id",
        NODE,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("is in use by a running server"), "{err}");
    assert!(!other_pool.exists(), "the second serve created its pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_client_clones_restores_lists_snapshots_and_reports_capacity() {
    if !root_or_skip("csi_client_clones_restores_lists_snapshots") {
        return;
    }
    let d = Driver::start().await;
    let src = json_of(&csi(
        &d,
        &["create-volume", "--name", "src", "--size", "64Mi"],
    ));
    let src_id = src["volume_id"].as_str().unwrap().to_string();
    // The same name with a larger size: the conflict says "no upper limit", not "0".
    let again = csi(&d, &["create-volume", "--name", "src", "--size", "128Mi"]);
    assert!(!again.status.success());
    let err = text(&again.stderr);
    assert!(
        err.starts_with("ALREADY_EXISTS") && err.contains("no upper limit"),
        "{err}"
    );
    assert!(!err.contains(", 0]"), "{err}");

    let snap = json_of(&csi(&d, &["snapshot", "--name", "s1", "--source", &src_id]));
    let snap_id = snap["snapshot_id"].as_str().unwrap().to_string();
    let listed = json_of(&csi(&d, &["list-snapshots", "--source", &src_id]));
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["snapshot_id"], snap_id.as_str());
    assert!(listed[0]["creation_time"].as_str().unwrap().ends_with('Z'));

    let restored = json_of(&csi(
        &d,
        &[
            "create-volume",
            "--name",
            "restored",
            "--size",
            "64Mi",
            "--from-snapshot",
            &snap_id,
        ],
    ));
    let clone = json_of(&csi(
        &d,
        &[
            "create-volume",
            "--name",
            "clone",
            "--size",
            "64Mi",
            "--from-volume",
            &src_id,
        ],
    ));
    let all = json_of(&csi(&d, &["list-volumes"]));
    assert_eq!(all.as_array().unwrap().len(), 3, "{all}");
    let both = csi(
        &d,
        &[
            "create-volume",
            "--name",
            "x",
            "--size",
            "64Mi",
            "--from-volume",
            &src_id,
            "--from-snapshot",
            &snap_id,
        ],
    );
    assert!(!both.status.success(), "both sources accepted");

    let cap = json_of(&csi(&d, &["get-capacity"]));
    assert!(cap["available_capacity"].as_i64().unwrap() > 0, "{cap}");

    // The controller half of an expansion succeeds; the node half fails (nothing is staged
    // at that path): the message says what already happened.
    let exp = csi(
        &d,
        &[
            "expand",
            &src_id,
            "--size",
            "128Mi",
            "--path",
            d.path("not-staged").to_str().unwrap(),
        ],
    );
    let err = text(&exp.stderr);
    assert_eq!(exp.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ControllerExpandVolume succeeded (the volume is now 134217728 bytes)")
            && err.contains("NodeExpandVolume"),
        "{err}"
    );

    for id in [
        &src_id,
        restored["volume_id"].as_str().unwrap(),
        clone["volume_id"].as_str().unwrap(),
    ] {
        let _ = csi(&d, &["delete-snapshot", &snap_id]);
        assert!(csi(&d, &["delete-volume", id]).status.success());
    }
}
