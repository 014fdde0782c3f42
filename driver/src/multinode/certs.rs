//! `loopvol certs --out DIR`: the certificates for the router ↔ node-pool mTLS link.
//! One CA signs one node certificate (DNS name `loopvol-node`, shared by every node: the router
//! connects by pod IP and verifies that name; it is a client certificate too, so that a node
//! can pull restore and clone data from another node's pool API) and one client certificate (the router's identity).
//! It also signs the server certificate of the external-snapshot-metadata sidecar's Service,
//! which backup clients verify with the CA in the SnapshotMetadataService object.

use std::path::Path;

use anyhow::Context;
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The DNS name every node's pool certificate carries and the router verifies.
pub use crate::multinode::tls::NODE_SERVER_NAME;

/// The Service in front of the external-snapshot-metadata sidecar (overlays/snapshot-metadata/).
pub const SNAPSHOT_METADATA_SERVICE: &str = "loopvol-snapshot-metadata";

pub struct Bundle {
    pub ca_crt: String,
    /// Kept so that more certificates can be issued later (`loopvol certs --out` writes it).
    pub ca_key: String,
    pub server_crt: String,
    pub server_key: String,
    pub client_crt: String,
    pub client_key: String,
    /// The snapshot-metadata sidecar's serving certificate, for its Service's DNS names.
    pub snapshot_metadata_crt: String,
    pub snapshot_metadata_key: String,
}

pub fn generate(namespace: &str) -> anyhow::Result<Bundle> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "loopvol CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // rcgen's default validity is 1975–4096; a CA of ten years and leaves of one instead.
    let now = time::OffsetDateTime::now_utc();
    ca.not_before = now - time::Duration::hours(1);
    ca.not_after = now + time::Duration::days(crate::multinode::cert_bootstrap::CA_DAYS);
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca, ca_key)?;

    let leaf = |cn: &str,
                sans: Vec<String>,
                usage: Vec<ExtendedKeyUsagePurpose>|
     -> anyhow::Result<(String, String)> {
        let mut p = CertificateParams::new(sans)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(crate::multinode::cert_bootstrap::LEAF_DAYS);
        p.extended_key_usages = usage;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_crt, server_key) = leaf(
        NODE_SERVER_NAME,
        vec![NODE_SERVER_NAME.to_string()],
        // Client too: a node pulls restore and clone data from another node's pool API.
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    )?;
    let (client_crt, client_key) = leaf(
        "loopvol-router",
        vec![],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    )?;
    let svc = SNAPSHOT_METADATA_SERVICE;
    let (snapshot_metadata_crt, snapshot_metadata_key) = leaf(
        svc,
        vec![
            svc.to_string(),
            format!("{svc}.{namespace}"),
            format!("{svc}.{namespace}.svc"),
        ],
        vec![ExtendedKeyUsagePurpose::ServerAuth],
    )?;
    Ok(Bundle {
        ca_crt: ca.pem(),
        ca_key: ca_key_pem,
        server_crt,
        server_key,
        client_crt,
        client_key,
        snapshot_metadata_crt,
        snapshot_metadata_key,
    })
}

/// A Secret holding the bundle, mounted by both the controller and the node plugin.
pub fn secret_yaml(b: &Bundle, name: &str, namespace: &str) -> String {
    let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\ntype: Opaque\ndata:\n  ca.crt: {}\n  server.crt: {}\n  server.key: {}\n  client.crt: {}\n  client.key: {}\n",
        enc(&b.ca_crt),
        enc(&b.server_crt),
        enc(&b.server_key),
        enc(&b.client_crt),
        enc(&b.client_key)
    )
}

/// The SnapshotMetadataService object: where backup clients find the sidecar, and the CA its
/// certificate is signed by. Named after the driver, as the sidecar looks it up.
pub fn snapshot_metadata_service_yaml(b: &Bundle, driver: &str, namespace: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(&b.ca_crt);
    format!(
        "# Beta (cbt.storage.k8s.io/v1beta1, external-snapshot-metadata v1.0). Generated by\n\
         # `loopvol certs`: caCert is the CA that signed the sidecar's certificate.\n\
         apiVersion: cbt.storage.k8s.io/v1beta1\nkind: SnapshotMetadataService\nmetadata:\n  name: {driver}\n\
         spec:\n  address: {SNAPSHOT_METADATA_SERVICE}.{namespace}:6443\n  audience: {SNAPSHOT_METADATA_SERVICE}\n  caCert: {ca}\n"
    )
}

/// Write the bundle into `dir`; keys are 0600. The sidecar's certificate, key and the
/// SnapshotMetadataService object go to `dir/snapshot-metadata/`, ready to be copied into
/// `overlays/snapshot-metadata/certs/`.
pub fn write(dir: &Path, namespace: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir.join("snapshot-metadata"))
        .with_context(|| format!("create {}", dir.display()))?;
    let b = generate(namespace)?;
    let smd = snapshot_metadata_service_yaml(&b, "loopvol.csi.dev", namespace);
    let files = [
        ("ca.crt", &b.ca_crt, 0o644),
        ("ca.key", &b.ca_key, 0o600),
        ("server.crt", &b.server_crt, 0o644),
        ("server.key", &b.server_key, 0o600),
        ("client.crt", &b.client_crt, 0o644),
        ("client.key", &b.client_key, 0o600),
        ("snapshot-metadata/tls.crt", &b.snapshot_metadata_crt, 0o644),
        ("snapshot-metadata/tls.key", &b.snapshot_metadata_key, 0o600),
        (
            "snapshot-metadata/snapshotmetadataservice.yaml",
            &smd,
            0o644,
        ),
    ];
    for (name, content, mode) in files {
        let p = dir.join(name);
        std::fs::write(&p, content).with_context(|| format!("write {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    let secret = dir.join("secret.yaml");
    std::fs::write(&secret, secret_yaml(&b, "loopvol-tls", namespace))?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes pull restore and clone data from each other: the node certificate must be
    /// usable by a client as well as a server (a TLS server checks the clientAuth usage).
    #[test]
    fn the_node_certificate_serves_and_calls() {
        let b = generate("loopvol-system").unwrap();
        let usage = |pem: &str| {
            let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
            let cert = pem.parse_x509().unwrap();
            let eku = cert.extended_key_usage().unwrap().unwrap().value.clone();
            (eku.server_auth, eku.client_auth)
        };
        assert_eq!(usage(&b.server_crt), (true, true));
        assert_eq!(usage(&b.client_crt), (false, true));
    }

    #[test]
    fn bundle_is_pem_and_secret_carries_every_file() {
        let b = generate("loopvol-system").unwrap();
        let smd = snapshot_metadata_service_yaml(&b, "loopvol.csi.dev", "loopvol-system");
        assert!(smd.contains("address: loopvol-snapshot-metadata.loopvol-system:6443"));
        for pem in [&b.ca_crt, &b.server_crt, &b.client_crt] {
            assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        }
        assert!(b.server_key.contains("PRIVATE KEY"));
        let y = secret_yaml(&b, "loopvol-tls", "loopvol-system");
        for key in [
            "ca.crt:",
            "server.crt:",
            "server.key:",
            "client.crt:",
            "client.key:",
        ] {
            assert!(y.contains(key), "{key}");
        }
    }
}
