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
use loopvol::csi::*;

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
    // One parser for every --size: `--size -1` reaches it (not "unexpected argument"), every
    // value above the largest volume gets the same words and the same exit status whether or
    // not it fits in 64 bits, and white space is refused as Kubernetes refuses it.
    let csi_size = |flag: &str, size: &str| {
        loopvol(&[
            "csi",
            "--endpoint",
            "unix:///nonexistent/csi.sock",
            flag,
            "vol-00000000000000000000@n",
            "--size",
            size,
        ])
    };
    for size in [
        "-1",
        "-1Gi",
        " 1Gi",
        "1Gi ",
        "17Ti",
        "8Ei",
        "99999999999999999999",
    ] {
        let create = run_in(
            t.path(),
            &["volume", "create", "--name", "bad", "--size", size],
        );
        let mut csi_create = vec!["csi", "create-volume", "--name", "bad", "--size", size];
        csi_create.splice(1..1, ["--endpoint", "unix:///nonexistent/csi.sock"]);
        for (what, o) in [
            ("volume create", create),
            ("csi create-volume", loopvol(&csi_create)),
            ("csi expand", csi_size("expand", size)),
        ] {
            let err = text(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{what} --size {size:?}: {err}");
            assert!(
                err.contains(&format!("invalid value '{size}' for '--size <SIZE>'")),
                "{what} --size {size:?}: {err}"
            );
            let why = if size.trim().starts_with('-') {
                "it is negative".to_string()
            } else if size.contains(' ') {
                "it contains white space".to_string()
            } else {
                format!("{size:?} is too large: the most is 16.0 TiB")
            };
            assert!(err.contains(&why), "{what} --size {size:?}: {err}");
        }
    }
    assert!(!t.path().join("pool/volumes").read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("bad")));

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
    assert!(
        err.starts_with("error: no volume with the ID or name"),
        "{err}"
    );
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

    // Names are unique in a pool: the name finds the same volume as the ID.
    let by_name = run_in(t.path(), &["volume", "inspect", "when", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&by_name.stdout)
        .unwrap_or_else(|_| panic!("{}", text(&by_name.stderr)));
    assert_eq!(v["record"]["id"], id.as_str(), "{v}");
    let unknown = run_in(t.path(), &["volume", "inspect", "nobody"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        text(&unknown.stderr).contains("no volume with the ID or name \"nobody\""),
        "{}",
        text(&unknown.stderr)
    );
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
    // One time format for a snapshot, whichever command printed it.
    assert!(
        snap["creation_time"].as_str().unwrap().ends_with('Z'),
        "{snap}"
    );
    assert!(snap.get("creation_time_unix").is_none(), "{snap}");
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
    // No --size for a clone: it is as large as its source.
    let clone = json_of(&csi(
        &d,
        &["create-volume", "--name", "clone", "--from-volume", &src_id],
    ));
    assert_eq!(clone["capacity_bytes"], 64 << 20, "{clone}");
    let no_size = csi(&d, &["create-volume", "--name", "blank"]);
    assert_eq!(
        no_size.status.code(),
        Some(2),
        "a blank volume needs --size"
    );
    // The same name with another source: the conflict names the source in words.
    let other = csi(
        &d,
        &[
            "create-volume",
            "--name",
            "clone",
            "--from-snapshot",
            &snap_id,
        ],
    );
    let err = text(&other.stderr);
    assert!(
        err.starts_with("ALREADY_EXISTS")
            && err.contains(&format!("content source volume {src_id}")),
        "{err}"
    );
    assert!(
        !err.contains("Some(") && !err.contains("Volume(\""),
        "{err}"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_client_modifies_io_limits_takes_group_snapshots_and_reports_health() {
    if !root_or_skip("csi_client_modifies_io_limits_takes_group_snapshots") {
        return;
    }
    let d = Driver::start().await;
    let mut ids = Vec::new();
    for name in ["g1", "g2"] {
        let v = json_of(&csi(
            &d,
            &["create-volume", "--name", name, "--size", "64Mi"],
        ));
        ids.push(v["volume_id"].as_str().unwrap().to_string());
    }
    let pool = d.pool.to_str().unwrap();

    // IO limits by hand, as a VolumeAttributesClass would change them.
    let m = json_of(&csi(
        &d,
        &[
            "modify-volume",
            &ids[0],
            "--param",
            "readIOPS=100",
            "--param",
            "writeBPS=10Mi",
        ],
    ));
    assert_eq!(m["modified"], ids[0].as_str(), "{m}");
    let inspected = loopvol(&[
        "volume",
        "inspect",
        &ids[0],
        "-o",
        "json",
        "--pool-dir",
        pool,
    ]);
    let rec = json_of(&inspected);
    let limits = rec["record"]["io_limits"].to_string();
    assert!(
        limits.contains("100") && limits.contains(&(10u64 << 20).to_string()),
        "{rec}"
    );
    let bad = csi(&d, &["modify-volume", &ids[0], "--param", "speed=fast"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).starts_with("INVALID_ARGUMENT"),
        "{}",
        text(&bad.stderr)
    );
    assert_eq!(
        json_of(&loopvol(&[
            "volume",
            "inspect",
            &ids[0],
            "-o",
            "json",
            "--pool-dir",
            pool
        ]))["record"]["io_limits"]
            .to_string(),
        limits,
        "a refused change changed the record"
    );

    // Group snapshots: create, get, delete.
    let g = json_of(&csi(
        &d,
        &[
            "create-group-snapshot",
            "--name",
            "grp",
            "--source",
            &ids[0],
            "--source",
            &ids[1],
        ],
    ));
    let gid = g["group_snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(g["snapshots"].as_array().unwrap().len(), 2, "{g}");
    assert!(g["creation_time"].as_str().unwrap().ends_with('Z'), "{g}");
    let got = json_of(&csi(&d, &["get-group-snapshot", &gid]));
    assert_eq!(got["group_snapshot_id"], gid.as_str(), "{got}");
    let member = got["snapshots"][0]["snapshot_id"].as_str().unwrap();
    let one = json_of(&csi(&d, &["get-snapshot", member]));
    assert_eq!(one["snapshot_id"], member, "{one}");
    assert!(csi(&d, &["delete-group-snapshot", &gid]).status.success());
    let gone = csi(&d, &["get-group-snapshot", &gid]);
    assert!(
        text(&gone.stderr).starts_with("NOT_FOUND"),
        "{}",
        text(&gone.stderr)
    );
    let again = csi(&d, &["delete-group-snapshot", &gid]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("nothing deleted"),
        "{}",
        text(&again.stderr)
    );

    // Health and lookup.
    let v = json_of(&csi(&d, &["get-volume", &ids[1]]));
    assert_eq!(v["volume_id"], ids[1].as_str(), "{v}");
    assert_eq!(v["capacity_bytes"], 64 << 20, "{v}");
    let h = json_of(&csi(&d, &["volume-health", &ids[1]]));
    assert_eq!(h["healthy"], true, "{h}");
    let nh = json_of(&csi(&d, &["node-volume-health", &ids[1]]));
    assert_eq!(nh["volume_id"], ids[1].as_str(), "{nh}");
    let all = json_of(&csi(&d, &["list-volume-health"]));
    assert!(all.as_array().is_some(), "{all}");
    let sh = json_of(&csi(&d, &["storage-health"]));
    assert_eq!(sh["healthy"], true, "{sh}");

    for id in &ids {
        assert!(csi(&d, &["delete-volume", id]).status.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_what_does_not_exist_says_not_found_and_exits_1_like_kubectl() {
    if !root_or_skip("deleting_what_does_not_exist_says_not_found") {
        return;
    }
    let d = Driver::start().await;
    let v = json_of(&csi(
        &d,
        &["create-volume", "--name", "real", "--size", "64Mi"],
    ));
    let id = v["volume_id"].as_str().unwrap().to_string();
    let foreign = id.replace(&format!("@{NODE}"), "@another-node");
    for (rpc, missing) in [
        ("delete-volume", "garbage"),
        ("delete-volume", "vol-00000000000000000000@test-node"),
        ("delete-volume", foreign.as_str()),
        ("delete-snapshot", "snap-00000000000000000000@test-node"),
        ("delete-group-snapshot", "garbage"),
    ] {
        let o = csi(&d, &[rpc, missing]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{rpc} {missing}: {err}");
        assert!(
            err.starts_with("NOT_FOUND") && err.contains("nothing deleted"),
            "{rpc} {missing}: {err}"
        );
        assert!(o.stdout.is_empty(), "{rpc} {missing} printed a result");
    }
    // The real one is untouched by all that, and deletes once; the second time it is gone.
    let snap = json_of(&csi(&d, &["snapshot", "--name", "s", "--source", &id]));
    let sid = snap["snapshot_id"].as_str().unwrap();
    assert_eq!(json_of(&csi(&d, &["delete-snapshot", sid]))["deleted"], sid);
    assert_eq!(csi(&d, &["delete-snapshot", sid]).status.code(), Some(1));
    assert_eq!(
        json_of(&csi(&d, &["delete-volume", &id]))["deleted"],
        id.as_str()
    );
    assert_eq!(csi(&d, &["delete-volume", &id]).status.code(), Some(1));
}

/// The STATE column of `volume list` and the state `status` prints come from one derivation:
/// staged, published (a mount volume and a raw block one), frozen for a copy in progress, and
/// frozen by a loopvol that was killed mid-freeze, which `status` used to call plain "staged".
/// Block staging makes nothing at the staging path, as `csi stage --help` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_list_and_status_say_staged_published_and_frozen() {
    if !root_or_skip("volume_list_and_status_say_staged_published_and_frozen") {
        return;
    }
    let mut d = Driver::start_with(&["--test-freeze-hold-ms", "60000"]).await;
    let pool = d.pool.to_str().unwrap().to_string();
    let state_of = |name: &str| -> String {
        let out = loopvol(&["volume", "list", "-o", "json", "--pool-dir", &pool]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let fs = json_of(&csi(
        &d,
        &["create-volume", "--name", "fs", "--size", "64Mi"],
    ));
    let fs_id = fs["volume_id"].as_str().unwrap().to_string();
    let blk = json_of(&csi(
        &d,
        &[
            "create-volume",
            "--name",
            "blk",
            "--size",
            "64Mi",
            "--block",
        ],
    ));
    let blk_id = blk["volume_id"].as_str().unwrap().to_string();
    assert_eq!(state_of("fs"), "-");
    // A raw block volume has no filesystem: none in its context, `block` in the list.
    assert!(blk["volume_context"].get("fsType").is_none(), "{blk}");
    assert_eq!(fs["volume_context"]["fsType"], "ext4", "{fs}");
    let table = text(&loopvol(&["volume", "list", "--pool-dir", &pool]).stdout);
    let fs_col = table.lines().next().unwrap().find("FS").unwrap();
    let row = table.lines().find(|l| l.contains("blk")).unwrap();
    assert!(row[fs_col..].starts_with("block "), "{table}");

    let (staging, target) = (d.path("staging"), d.path("pod"));
    let (bstaging, btarget) = (d.path("bstaging"), d.path("bpod"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(&bstaging).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    json_of(&csi(&d, &["stage", &fs_id, "--staging-path", &s(&staging)]));
    assert_eq!(state_of("fs"), "staged");
    // A conflicting stage is explained in words, not in Rust's Debug of the capability.
    let again = csi(
        &d,
        &["stage", &fs_id, "--staging-path", &s(&staging), "--block"],
    );
    let err = text(&again.stderr);
    assert!(
        err.starts_with("ALREADY_EXISTS")
            && err.contains("as ext4 filesystem, and this request asks for raw block"),
        "{err}"
    );
    assert!(
        !err.contains("Mount {") && !err.contains("flags: ["),
        "{err}"
    );
    json_of(&csi(
        &d,
        &[
            "publish",
            &fs_id,
            "--staging-path",
            &s(&staging),
            "--target-path",
            &s(&target),
        ],
    ));
    assert_eq!(state_of("fs"), "published");

    json_of(&csi(
        &d,
        &["stage", &blk_id, "--staging-path", &s(&bstaging), "--block"],
    ));
    // As `csi stage --help` says: nothing is made at a block volume's staging path.
    assert!(bstaging.is_dir() && std::fs::read_dir(&bstaging).unwrap().next().is_none());
    let help = text(&loopvol(&["csi", "stage", "--help"]).stdout);
    assert!(
        help.contains("for a block volume nothing is made there"),
        "{help}"
    );
    assert_eq!(state_of("blk"), "staged");
    json_of(&csi(
        &d,
        &[
            "publish",
            &blk_id,
            "--staging-path",
            &s(&bstaging),
            "--target-path",
            &s(&btarget),
            "--block",
        ],
    ));
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&btarget)
        .unwrap()
        .file_type()
        .is_block_device());
    assert_eq!(state_of("blk"), "published");

    // A snapshot holds the filesystem frozen (the test flag keeps it so for a minute).
    let _thaw = ThawOnDrop(staging.clone());
    let ep = format!("unix://{}", d.socket.display());
    let mut snap = Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args([
            "csi",
            "--endpoint",
            &ep,
            "snapshot",
            "--name",
            "held",
            "--source",
            &fs_id,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !state_of("fs").contains("frozen") {
        assert!(t0.elapsed().as_secs() < 20, "no freeze began");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(state_of("fs"), "published, frozen for a copy");

    // The driver and its guardian are killed mid-freeze: the filesystem stays frozen.
    for g in guardians_of(d.pid()) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(g),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    d.kill9();
    let _ = snap.wait();
    assert_eq!(state_of("fs"), "published, frozen, its loopvol died");
    let status = text(&loopvol(&["status", "--pool-dir", &pool]).stdout);
    assert!(
        status.contains("published, frozen, its loopvol died"),
        "{status}"
    );
    let json = json_of(&loopvol(&["status", "-o", "json", "--pool-dir", &pool]));
    let staged = json["staged"].as_array().unwrap();
    let fs_view = staged
        .iter()
        .find(|v| v["volume_id"] == fs_id.as_str())
        .unwrap();
    assert_eq!(fs_view["frozen"], "frozen, its loopvol died", "{json}");
    assert_eq!(fs_view["published"], true, "{json}");

    // A restarted driver thaws it before serving; then everything comes apart by hand.
    d.spawn().await;
    assert_eq!(state_of("fs"), "published");
    for (id, st, tg) in [(&fs_id, &staging, &target), (&blk_id, &bstaging, &btarget)] {
        json_of(&csi(&d, &["unpublish", id, "--target-path", &s(tg)]));
        json_of(&csi(&d, &["unstage", id, "--staging-path", &s(st)]));
        json_of(&csi(&d, &["delete-volume", id]));
    }
}

// ---------------------------------------------------------------------------------------------
// A pool belongs to one node ID: `serve` under another is refused, `pool set-node-id` moves it.

/// Every file of the pool but the lock files, with its bytes (images: only their names, since
/// the kernel may still write to the image of a mounted filesystem).
fn pool_files(pool: &Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    fn walk(d: &Path, out: &mut std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            let name = p.to_string_lossy();
            if p.is_dir() {
                walk(&p, out);
            } else if name.ends_with(".img") {
                out.insert(p.clone(), Vec::new());
            } else if !name.ends_with(".lock") {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(pool, &mut out);
    out
}

/// `loopvol serve` on the test's pool, with `--node-id node` (or none: the hostname), which
/// must exit by itself: a serve that starts is killed and reported as such.
fn serve_refused(d: &Driver, node: Option<&str>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loopvol"));
    cmd.arg("serve")
        .arg("--endpoint")
        .arg(format!("unix://{}", d.path("other.sock").display()))
        .arg("--pool-dir")
        .arg(&d.pool)
        .env_remove("LOOPVOL_NODE_ID")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if let Some(n) = node {
        cmd.args(["--node-id", n]);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "serve under {node:?} started on a pool of {NODE}:\n{}",
                text(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    text(&out.stderr)
}

fn set_node_id(pool: &Path, node: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args(["pool", "set-node-id", "--pool-dir"])
        .arg(pool)
        .arg(node)
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn hostname() -> String {
    nix::unistd::gethostname().unwrap().into_string().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_under_another_node_id_is_refused_and_changes_nothing() {
    if !root_or_skip("serve_under_another_node_id_is_refused") {
        return;
    }
    let mut d = Driver::start().await;
    let (mut c, mut n) = (d.controller().await, d.node().await);
    let id = create_volume_id(&mut c, create_req("mine", 32 * MIB, rw_mount("ext4"))).await;
    let staging = d.path("staging-mine");
    n.node_stage_volume(stage_req(&id, &staging, rw_mount("ext4")))
        .await
        .unwrap();
    d.stop();
    assert_eq!(
        std::fs::read_to_string(d.pool.join(".node-id")).unwrap(),
        format!("{NODE}\n")
    );
    let before = pool_files(&d.pool);
    // The first-hour trap: `serve` without --node-id (the hostname) on a pool of test-node.
    let host = hostname();
    assert_ne!(host, NODE);
    for (node, named) in [(None, host.as_str()), (Some("node-b"), "node-b")] {
        let err = serve_refused(&d, node);
        for says in [
            format!("belongs to node \"{NODE}\""),
            format!("not to \"{named}\""),
            format!("serve it with --node-id {NODE}"),
            format!(
                "loopvol pool set-node-id --pool-dir {} {named}",
                d.pool.display()
            ),
        ] {
            assert!(err.contains(&says), "{says}:\n{err}");
        }
        assert_eq!(
            pool_files(&d.pool),
            before,
            "a refused serve changed the pool"
        );
        assert!(!d.path("other.sock").exists());
    }
    // The offline CLI is refused the same way.
    let out = run_in(d.dir.path(), &["volume", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut args: Vec<String> = ["volume", "create", "--name", "x", "--size", "16Mi"]
        .map(String::from)
        .to_vec();
    args.extend(["--pool-dir".into(), d.pool.display().to_string()]);
    args.extend(["--node-id".into(), "node-b".into()]);
    let out = loopvol(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success(), "volume create under another node");
    assert!(text(&out.stderr).contains("loopvol pool set-node-id"));
    assert_eq!(pool_files(&d.pool), before);

    // A pool from before `.node-id` existed belongs to the node its records name.
    std::fs::remove_file(d.pool.join(".node-id")).unwrap();
    let err = serve_refused(&d, Some("node-b"));
    assert!(
        err.contains(&format!("belongs to node \"{NODE}\"")),
        "{err}"
    );
    assert!(!d.pool.join(".node-id").exists());

    // The node plugin's restart under its own ID still works, and records the ID again.
    d.spawn().await;
    assert_eq!(
        std::fs::read_to_string(d.pool.join(".node-id")).unwrap(),
        format!("{NODE}\n")
    );
    let (mut c, mut n) = (d.controller().await, d.node().await);
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    c.delete_volume(DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!d.image_of(&id).exists());
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_node_id_waits_for_unstage_then_the_new_node_serves_the_rekeyed_volumes() {
    if !root_or_skip("set_node_id_rekeys") {
        return;
    }
    let mut d = Driver::start().await;
    let (mut c, mut n) = (d.controller().await, d.node().await);
    let id = create_volume_id(&mut c, create_req("data", 32 * MIB, rw_mount("ext4"))).await;
    let staging = d.path("staging-data");
    n.node_stage_volume(stage_req(&id, &staging, rw_mount("ext4")))
        .await
        .unwrap();
    std::fs::write(staging.join("kept"), b"written under test-node").unwrap();
    let snap = c
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "snap".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    d.stop();

    // Staged: refused, nothing changes.
    let before = pool_files(&d.pool);
    let out = set_node_id(&d.pool, "node-b", &[], &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&hex_of(&id)) && err.contains("staged at") && err.contains("unstage"),
        "{err}"
    );
    assert_eq!(pool_files(&d.pool), before);

    // Drained: the driver unstages under the old ID, then the pool is re-keyed.
    d.spawn().await;
    let mut n = d.node().await;
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    d.stop();
    let out = set_node_id(&d.pool, "node-b", &["-o", "json"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let new_id = id.replace(&format!("@{NODE}"), "@node-b");
    let new_snap = snap.replace(&format!("@{NODE}"), "@node-b");
    assert_eq!(report["from"], serde_json::json!([NODE]), "{report}");
    assert_eq!(report["to"], "node-b");
    assert_eq!(
        report["ids"],
        serde_json::json!([
            {"kind": "volume", "old": id, "new": new_id},
            {"kind": "snapshot", "old": snap, "new": new_snap},
        ])
    );
    assert!(text(&out.stderr).contains("Serve it with --node-id node-b"));
    let err = serve_refused(&d, Some(NODE));
    assert!(err.contains("belongs to node \"node-b\""), "{err}");

    d.set_node_id("node-b");
    d.spawn().await;
    let (mut c, mut n) = (d.controller().await, d.node().await);
    let listed = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let ids: Vec<_> = listed
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    assert_eq!(ids, vec![new_id.clone()]);
    // The name still resolves to the volume, under its new ID.
    let again = create_volume_id(&mut c, create_req("data", 32 * MIB, rw_mount("ext4"))).await;
    assert_eq!(again, new_id);
    // The old ID is another node's now.
    let old = n
        .node_stage_volume(stage_req(&id, &staging, rw_mount("ext4")))
        .await;
    assert_eq!(code_of(old), tonic::Code::NotFound);
    n.node_stage_volume(stage_req(&new_id, &staging, rw_mount("ext4")))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(staging.join("kept")).unwrap(),
        b"written under test-node"
    );
    n.node_unstage_volume(unstage_req(&new_id, &staging))
        .await
        .unwrap();
    // The snapshot restores, and everything deletes under the new IDs.
    let mut restore = create_req("restored", 32 * MIB, rw_mount("ext4"));
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: new_snap.clone(),
            },
        )),
    });
    let restored = create_volume_id(&mut c, restore).await;
    assert!(restored.ends_with("@node-b"));
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: new_snap.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    for v in [&restored, &new_id] {
        c.delete_volume(DeleteVolumeRequest {
            volume_id: v.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(!d.image_of(v).exists(), "{v} not deleted");
    }
    assert!(pool_files(&d.pool.join("snapshots")).is_empty());
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_set_node_id_is_refused_by_serve_and_finished_by_running_it_again() {
    if !root_or_skip("interrupted_set_node_id") {
        return;
    }
    let mut d = Driver::start().await;
    let mut c = d.controller().await;
    let mut ids = Vec::new();
    for name in ["one", "two", "three"] {
        ids.push(create_volume_id(&mut c, create_req(name, 16 * MIB, rw_mount("ext4"))).await);
    }
    d.stop();
    // Killed (SIGKILL) right after the first record is rewritten.
    let out = set_node_id(
        &d.pool,
        "node-b",
        &[],
        &[(loopvol::ops::pool_identity::ABORT_AFTER_ENV, "1")],
    );
    assert_eq!(out.status.code(), None, "{}", text(&out.stderr));
    assert!(d.pool.join(".node-id.rekey").exists());
    // One record re-keyed in place; the others still old (their new versions, if any, are in
    // temp files).
    let records: String = pool_files(&d.pool.join("volumes"))
        .into_iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "json"))
        .map(|(_, b)| String::from_utf8(b).unwrap())
        .collect();
    assert_eq!(records.matches("@node-b").count(), 1, "{records}");
    assert_eq!(records.matches(&format!("@{NODE}")).count(), 2, "{records}");
    let before = pool_files(&d.pool);
    for node in [NODE, "node-b"] {
        let err = serve_refused(&d, Some(node));
        assert!(
            err.contains("half-way through `loopvol pool set-node-id`")
                && err.contains(&format!(
                    "run `loopvol pool set-node-id --pool-dir {} node-b` again",
                    d.pool.display()
                )),
            "{err}"
        );
    }
    assert_eq!(pool_files(&d.pool), before);
    // Doctor says so too.
    let out = loopvol(&["doctor", "--pool-dir", d.pool.to_str().unwrap()]);
    let report = text(&out.stdout);
    assert!(!out.status.success(), "{report}");
    assert!(
        report.contains("✘ node ID: the pool") && report.contains("half-way through"),
        "{report}"
    );
    // Another destination is refused until this move is finished.
    let out = set_node_id(&d.pool, "node-c", &[], &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("half-way through a move to node \"node-b\""));

    let out = set_node_id(&d.pool, "node-b", &[], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("finished an interrupted run"));
    // The table maps every volume, also the one the killed run had already re-keyed.
    let table = text(&out.stdout);
    assert!(table.starts_with("KIND "), "{table}");
    for id in &ids {
        let new = id.replace(&format!("@{NODE}"), "@node-b");
        assert!(
            table
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["volume", id, &new]),
            "{id}:\n{table}"
        );
    }
    assert!(!d.pool.join(".node-id.rekey").exists());
    let stray: Vec<_> = pool_files(&d.pool)
        .into_keys()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");

    d.set_node_id("node-b");
    d.spawn().await;
    let mut c = d.controller().await;
    for id in &ids {
        let new = id.replace(&format!("@{NODE}"), "@node-b");
        c.delete_volume(DeleteVolumeRequest {
            volume_id: new.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(!d.image_of(&new).exists(), "{new} not deleted");
    }
    d.assert_clean();
}

/// `volume list` and `volume inspect` say which pool a volume belongs to, from its ID: the
/// short form is the pool `default`, `vol-<hex>~fast@node` the pool `fast`.
#[test]
fn volume_list_and_inspect_name_the_pool() {
    let default = tempfile::tempdir().unwrap();
    let fast = tempfile::tempdir().unwrap();
    let o = run_in(
        default.path(),
        &["volume", "create", "--name", "plain", "--size", "16Mi"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = run_in(
        fast.path(),
        &[
            "volume",
            "create",
            "--pool-name",
            "fast",
            "--name",
            "quick",
            "--size",
            "16Mi",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));

    for (dir, pool) in [(default.path(), "default"), (fast.path(), "fast")] {
        for output in ["table", "wide"] {
            let out = text(&run_in(dir, &["volume", "list", "-o", output]).stdout);
            let lines: Vec<&str> = out.lines().collect();
            let col = lines[0].find("POOL").unwrap_or_else(|| panic!("{out}"));
            assert!(lines[1][col..].starts_with(&format!("{pool} ")), "{out}");
        }
        let json = run_in(dir, &["volume", "list", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(v["volumes"][0]["pool"], pool, "{v}");
        let yaml = text(&run_in(dir, &["volume", "list", "-o", "yaml"]).stdout);
        assert!(yaml.contains(&format!("\n  pool: {pool}\n")), "{yaml}");

        let name = if pool == "fast" { "quick" } else { "plain" };
        let out = text(&run_in(dir, &["volume", "inspect", name]).stdout);
        assert!(
            out.lines().any(|l| l == format!("pool         {pool}")),
            "{out}"
        );
        let json = run_in(dir, &["volume", "inspect", name, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(v["pool"], pool, "{v}");
    }
}
