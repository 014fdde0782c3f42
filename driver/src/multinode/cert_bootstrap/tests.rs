//! The bootstrap's own tests: stores in temp directories.

use super::*;

fn parse(pem: &str) -> (Vec<u8>, String, String) {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let c = p.parse_x509().unwrap();
    (
        p.contents.clone(),
        c.subject().to_string(),
        c.issuer().to_string(),
    )
}

/// Verify `leaf` was signed by `ca`, with x509-parser's signature check.
fn signed_by(leaf: &str, ca: &str) -> bool {
    let (_, lp) = x509_parser::pem::parse_x509_pem(leaf.as_bytes()).unwrap();
    let (_, cp) = x509_parser::pem::parse_x509_pem(ca.as_bytes()).unwrap();
    let l = lp.parse_x509().unwrap();
    let c = cp.parse_x509().unwrap();
    l.verify_signature(Some(c.public_key())).is_ok()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

#[test]
fn bootstrap_creates_the_ca_once_and_every_pod_shares_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore {
        root: tmp.path().join("store"),
    };
    let now = OffsetDateTime::now_utc();
    let a = bootstrap(
        &store,
        "loopvol-ca",
        Role::Node,
        &tmp.path().join("a"),
        now,
        365,
    )
    .unwrap();
    let b = bootstrap(
        &store,
        "loopvol-ca",
        Role::Router,
        &tmp.path().join("b"),
        now,
        365,
    )
    .unwrap();
    assert_eq!(a.trusted, 1);
    let ca = read(&tmp.path().join("a/ca.crt"));
    assert_eq!(
        ca,
        read(&tmp.path().join("b/ca.crt")),
        "one CA for all pods"
    );
    let stored = store.get("loopvol-ca").unwrap().unwrap();
    assert!(stored.data.contains_key(CA_KEY), "the CA key is kept");
    for dir in ["a", "b"] {
        assert!(signed_by(&read(&tmp.path().join(dir).join("tls.crt")), &ca));
        let mode = std::fs::metadata(tmp.path().join(dir).join("tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Sensible validity: the CA about ten years, a leaf one year.
    let ca_days = (a.ca_not_after - now).whole_days();
    assert!((3649..=3650).contains(&ca_days), "{ca_days}");
    let leaf_days = (b.leaf_not_after - now).whole_days();
    assert!((364..=365).contains(&leaf_days), "{leaf_days}");
    let (_, subject, _) = parse(&read(&tmp.path().join("a/tls.crt")));
    assert!(subject.contains("loopvol-node"), "{subject}");
}

#[test]
fn racing_creators_end_up_with_the_winners_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let now = OffsetDateTime::now_utc();
    let cas: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let root = root.clone();
                let out = tmp.path().join(format!("pod{i}"));
                s.spawn(move || {
                    bootstrap(&DirStore { root }, "loopvol-ca", Role::Node, &out, now, 30).unwrap();
                    read(&out.join("ca.crt"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        cas.windows(2).all(|w| w[0] == w[1]),
        "pods disagree on the CA"
    );
}

#[test]
fn rotation_keeps_old_and_new_peers_trusting_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore {
        root: tmp.path().join("store"),
    };
    let now = OffsetDateTime::now_utc();
    let out = |n: &str| tmp.path().join(n);
    bootstrap(&store, "loopvol-ca", Role::Node, &out("old"), now, 365).unwrap();
    let old_ca = text(&store.get("loopvol-ca").unwrap().unwrap().data, CA_CRT)
        .unwrap()
        .to_string();

    assert!(
        rotate(&store, "loopvol-ca", true, now).is_err(),
        "nothing staged"
    );
    assert_eq!(
        rotate(&store, "loopvol-ca", false, now).unwrap(),
        Rotated::Staged
    );
    assert!(
        rotate(&store, "loopvol-ca", false, now).is_err(),
        "staged twice"
    );
    // Restarted pods trust both CAs but are still signed by the old one.
    let staged = bootstrap(&store, "loopvol-ca", Role::Router, &out("mid"), now, 365).unwrap();
    assert_eq!(staged.trusted, 2);
    assert!(signed_by(&read(&out("mid").join("tls.crt")), &old_ca));

    assert_eq!(
        rotate(&store, "loopvol-ca", true, now).unwrap(),
        Rotated::Promoted
    );
    let data = store.get("loopvol-ca").unwrap().unwrap().data;
    let new_ca = text(&data, CA_CRT).unwrap().to_string();
    assert_ne!(new_ca, old_ca);
    assert_eq!(text(&data, PREVIOUS_CRT).unwrap(), old_ca);
    assert!(!data.contains_key(NEXT_CRT) && !data.contains_key(NEXT_KEY));
    let after = bootstrap(&store, "loopvol-ca", Role::Node, &out("new"), now, 365).unwrap();
    assert_eq!(after.trusted, 2);
    let leaf = read(&out("new").join("tls.crt"));
    assert!(signed_by(&leaf, &new_ca) && !signed_by(&leaf, &old_ca));
    // A pod from before the rotation (signed by the old CA) is still trusted by new pods.
    let bundle = read(&out("new").join("ca.crt"));
    assert!(bundle.contains(old_ca.trim_end()) && bundle.contains(new_ca.trim_end()));
    assert!(signed_by(&read(&out("old").join("tls.crt")), &old_ca));
}

#[test]
fn an_expired_ca_is_refused_with_the_way_out() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore {
        root: tmp.path().join("store"),
    };
    let then = OffsetDateTime::now_utc() - Duration::days(20);
    let (crt, key) = new_ca(then, 10).unwrap();
    store
        .create(
            "loopvol-ca",
            &[(CA_CRT.into(), crt.into()), (CA_KEY.into(), key.into())].into(),
        )
        .unwrap();
    let e = bootstrap(
        &store,
        "loopvol-ca",
        Role::Node,
        &tmp.path().join("o"),
        OffsetDateTime::now_utc(),
        365,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("expired") && e.contains("certs rotate"), "{e}");
}

#[test]
fn a_leaf_never_outlives_its_ca() {
    let now = OffsetDateTime::now_utc();
    let (crt, key) = new_ca(now, 30).unwrap();
    let (leaf, _) = issue(&crt, &key, Role::Node, now, 365).unwrap();
    assert_eq!(not_after(&leaf).unwrap(), not_after(&crt).unwrap());
}

#[test]
fn dir_store_detects_conflicts_and_bad_names() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore {
        root: tmp.path().to_path_buf(),
    };
    let d: SecretData = [("k".to_string(), b"v".to_vec())].into();
    store.create("s", &d).unwrap();
    assert!(matches!(
        store.create("s", &d),
        Err(StoreError::AlreadyExists(_))
    ));
    let v = store.get("s").unwrap().unwrap().version;
    store.update("s", &d, &v).unwrap();
    assert!(matches!(
        store.update("s", &d, &v),
        Err(StoreError::Conflict(_))
    ));
    assert!(store.get("../x").is_err());
}

/// A node's bootstrapped certificate serves the pool API and calls other nodes' (restores and
/// clones across nodes); the router's only calls.
#[test]
fn a_node_certificate_is_a_client_certificate_too() {
    let now = OffsetDateTime::now_utc();
    let (ca, key) = new_ca(now, 30).unwrap();
    let usage = |role| {
        let (crt, _) = issue(&ca, &key, role, now, 10).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(crt.as_bytes()).unwrap();
        let c = p.parse_x509().unwrap();
        let eku = c.extended_key_usage().unwrap().unwrap().value.clone();
        (eku.server_auth, eku.client_auth)
    };
    assert_eq!(usage(Role::Node), (true, true));
    assert_eq!(usage(Role::Router), (false, true));
}
