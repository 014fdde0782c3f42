//! `loopvol certs --out DIR`: the certificates for the router ↔ node-pool mTLS link.
//! One CA signs one server certificate (DNS name `loopvol-node`, shared by every node: the router
//! connects by pod IP and verifies that name) and one client certificate (the router's identity).

use std::path::Path;

use anyhow::Context;
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The DNS name every node's pool certificate carries and the router verifies.
pub const NODE_SERVER_NAME: &str = "loopvol-node";

pub struct Bundle {
    pub ca_crt: String,
    pub server_crt: String,
    pub server_key: String,
    pub client_crt: String,
    pub client_key: String,
}

pub fn generate() -> anyhow::Result<Bundle> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "loopvol CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

    let leaf = |cn: &str,
                sans: Vec<String>,
                usage: ExtendedKeyUsagePurpose|
     -> anyhow::Result<(String, String)> {
        let mut p = CertificateParams::new(sans)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
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
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_crt, client_key) = leaf(
        "loopvol-router",
        vec![],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    Ok(Bundle {
        ca_crt: ca.pem(),
        server_crt,
        server_key,
        client_crt,
        client_key,
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

/// Write the bundle into `dir`; keys are 0600.
pub fn write(dir: &Path, namespace: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let b = generate()?;
    let files = [
        ("ca.crt", &b.ca_crt, 0o644),
        ("server.crt", &b.server_crt, 0o644),
        ("server.key", &b.server_key, 0o600),
        ("client.crt", &b.client_crt, 0o644),
        ("client.key", &b.client_key, 0o600),
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

    #[test]
    fn bundle_is_pem_and_secret_carries_every_file() {
        let b = generate().unwrap();
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
