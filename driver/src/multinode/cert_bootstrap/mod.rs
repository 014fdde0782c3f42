//! `loopvol certs bootstrap` and `loopvol certs rotate`: the router ↔ node-pool mTLS
//! certificates, made inside the cluster so that `kubectl apply -k manifests/` needs no
//! pre-step.
//!
//! The CA (certificate and key) lives in one Secret. Every pod's init container runs
//! `bootstrap`: it creates the CA if the Secret does not exist yet (the first pod wins the
//! create; the others read what it wrote), then issues this pod's own short-lived leaf from it
//! into an in-memory directory. Leaves are never stored: a restarted pod gets a fresh one, so
//! renewing a leaf is a rollout restart and only the CA needs a rotation procedure.
//!
//! Rotation is two-phased so that no router and node ever disagree on trust: `rotate` stages a
//! new CA beside the current one (every pod restarted after that trusts both but still signs
//! with the old one); `rotate --promote` makes the new CA the signing one and keeps the old
//! certificate trusted until the next rotation, so pods not yet restarted still verify.
//!
//! The Secret store is a trait: the Kubernetes API in a cluster, a directory in tests and on
//! machines without Kubernetes.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::multinode::certs::NODE_SERVER_NAME;

/// Keys of the CA Secret.
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// A staged CA (after `rotate`, before `rotate --promote`): trusted, not yet signing.
pub const NEXT_CRT: &str = "next.crt";
pub const NEXT_KEY: &str = "next.key";
/// The CA before the last promotion: still trusted, so pods issued from it keep working.
pub const PREVIOUS_CRT: &str = "previous.crt";

/// Default lifetimes: the CA outlives many leaf generations; a leaf lives for a year and is
/// renewed by every pod restart.
pub const CA_DAYS: i64 = 3650;
pub const LEAF_DAYS: i64 = 365;

pub type SecretData = BTreeMap<String, Vec<u8>>;

/// A Secret's data and the version it was read at (Kubernetes' resourceVersion).
#[derive(Debug, Clone)]
pub struct Stored {
    pub data: SecretData,
    pub version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("secret {0} already exists")]
    AlreadyExists(String),
    #[error("secret {0} was changed by someone else since it was read")]
    Conflict(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Where the CA is kept. `create` must fail with `AlreadyExists` when the Secret exists (many
/// pods start at once and race to create it), and `update` with `Conflict` when `version` is
/// no longer current.
pub trait SecretStore {
    fn get(&self, name: &str) -> Result<Option<Stored>, StoreError>;
    fn create(&self, name: &str, data: &SecretData) -> Result<(), StoreError>;
    fn update(&self, name: &str, data: &SecretData, version: &str) -> Result<(), StoreError>;
}

// ------------------------------------------------------------------ certificates

fn validity(p: &mut CertificateParams, now: OffsetDateTime, days: i64) {
    // An hour of slack for clocks a little behind the issuing node's.
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days);
}

fn random_serial(p: &mut CertificateParams) -> anyhow::Result<()> {
    let mut serial = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut serial))
        .context("read /dev/urandom")?;
    serial[0] &= 0x7f; // positive
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(())
}

/// A new self-signed CA: (certificate PEM, key PEM).
pub fn new_ca(now: OffsetDateTime, days: i64) -> anyhow::Result<(String, String)> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, now, days);
    random_serial(&mut p)?;
    // Two generations trusted side by side during a rotation must not share a subject: the
    // date says which is which to a person, the serial's start makes them distinct.
    let serial = p
        .serial_number
        .as_ref()
        .map(|s| s.to_bytes())
        .unwrap_or_default();
    let tag: String = serial.iter().take(4).map(|b| format!("{b:02x}")).collect();
    p.distinguished_name.push(
        DnType::CommonName,
        format!("loopvol CA {} {tag}", now.date()),
    );
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Which side of the pool API a leaf is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// A node plugin's pool server: DNS name `loopvol-node`, which the router verifies.
    Node,
    /// The controller's router: a client certificate.
    Router,
}

/// A leaf for `role` signed by the CA: (certificate PEM, key PEM).
pub fn issue(
    ca_crt: &str,
    ca_key: &str,
    role: Role,
    now: OffsetDateTime,
    days: i64,
) -> anyhow::Result<(String, String)> {
    let (cn, sans, usage) = match role {
        // A node's certificate is a client's too: nodes pull restore and clone data from
        // each other's pool API.
        Role::Node => (
            NODE_SERVER_NAME,
            vec![NODE_SERVER_NAME.to_string()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        ),
        Role::Router => (
            "loopvol-router",
            vec![],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        ),
    };
    let issuer = Issuer::from_ca_cert_pem(
        ca_crt,
        KeyPair::from_pem(ca_key).context("the CA key does not parse")?,
    )
    .context("the CA certificate does not parse")?;
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = usage;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // A leaf never outlives its CA: past that date no peer would accept it anyway.
    let ca_end = not_after(ca_crt)?;
    validity(&mut p, now, days);
    if p.not_after > ca_end {
        p.not_after = ca_end;
    }
    random_serial(&mut p)?;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The end of a PEM certificate's validity.
pub fn not_after(pem: &str) -> anyhow::Result<OffsetDateTime> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?;
    Ok(cert.validity().not_after.to_datetime())
}

// ------------------------------------------------------------------ bootstrap and rotate

fn text<'a>(data: &'a SecretData, key: &str) -> Option<&'a str> {
    data.get(key).and_then(|v| std::str::from_utf8(v).ok())
}

/// The CA Secret, created with a new CA if it does not exist yet.
pub fn ensure_ca(
    store: &dyn SecretStore,
    name: &str,
    now: OffsetDateTime,
    ca_days: i64,
) -> anyhow::Result<Stored> {
    if let Some(s) = store.get(name)? {
        return Ok(s);
    }
    let (crt, key) = new_ca(now, ca_days)?;
    let data: SecretData = [(CA_CRT.into(), crt.into()), (CA_KEY.into(), key.into())].into();
    match store.create(name, &data) {
        Ok(()) => {
            tracing::info!(secret = name, "created the loopvol CA");
            store
                .get(name)?
                .with_context(|| format!("secret {name} vanished right after it was created"))
        }
        // Another pod created it first: use theirs, so every pod shares one CA.
        Err(StoreError::AlreadyExists(_)) => store
            .get(name)?
            .with_context(|| format!("secret {name} exists but cannot be read")),
        Err(e) => Err(e.into()),
    }
}

/// What `bootstrap` wrote.
#[derive(Debug)]
pub struct Issued {
    pub ca_not_after: OffsetDateTime,
    pub leaf_not_after: OffsetDateTime,
    /// How many CA certificates the trust bundle holds (2 or 3 during a rotation).
    pub trusted: usize,
}

/// Ensure the CA, issue this pod's leaf and write `tls.crt`, `tls.key` (0600) and `ca.crt`
/// (every CA currently trusted) into `out`.
pub fn bootstrap(
    store: &dyn SecretStore,
    name: &str,
    role: Role,
    out: &Path,
    now: OffsetDateTime,
    leaf_days: i64,
) -> anyhow::Result<Issued> {
    let s = ensure_ca(store, name, now, CA_DAYS)?;
    let (Some(ca_crt), Some(ca_key)) = (text(&s.data, CA_CRT), text(&s.data, CA_KEY)) else {
        bail!("secret {name} lacks {CA_CRT} or {CA_KEY}; delete it to start over, or restore it");
    };
    let ca_not_after = not_after(ca_crt)?;
    if ca_not_after <= now {
        bail!(
            "the loopvol CA in secret {name} expired at {ca_not_after}; run `loopvol certs rotate` \
             and `loopvol certs rotate --promote` (docs/operations.md, \"Certificate rotation\")"
        );
    }
    if ca_not_after - now < Duration::days(90) {
        tracing::warn!(secret = name, %ca_not_after, "the loopvol CA expires within 90 days: rotate it");
    }
    let (crt, key) = issue(ca_crt, ca_key, role, now, leaf_days)?;
    let mut bundle = String::new();
    for k in [CA_CRT, NEXT_CRT, PREVIOUS_CRT] {
        if let Some(pem) = text(&s.data, k) {
            // An expired previous CA is no use to trust.
            if not_after(pem).is_ok_and(|t| t > now) {
                bundle.push_str(pem.trim_end());
                bundle.push('\n');
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    write_file(&out.join("tls.crt"), crt.as_bytes(), 0o644)?;
    write_file(&out.join("tls.key"), key.as_bytes(), 0o600)?;
    write_file(&out.join("ca.crt"), bundle.as_bytes(), 0o644)?;
    Ok(Issued {
        ca_not_after,
        leaf_not_after: not_after(&crt)?,
        trusted: bundle.matches("BEGIN CERTIFICATE").count(),
    })
}

/// What a rotation step did.
#[derive(Debug, PartialEq, Eq)]
pub enum Rotated {
    /// A new CA is staged: trusted by pods restarted from now on, not signing yet.
    Staged,
    /// The staged CA now signs; the old one stays trusted.
    Promoted,
}

/// One step of a CA rotation (see the module doc). Retries on a concurrent update.
pub fn rotate(
    store: &dyn SecretStore,
    name: &str,
    promote: bool,
    now: OffsetDateTime,
) -> anyhow::Result<Rotated> {
    for _ in 0..5 {
        let Some(s) = store.get(name)? else {
            bail!("secret {name} does not exist: nothing to rotate (the first pod creates it)");
        };
        let mut data = s.data.clone();
        let step = if promote {
            let (Some(next_crt), Some(next_key)) = (data.remove(NEXT_CRT), data.remove(NEXT_KEY))
            else {
                bail!("no CA is staged in secret {name}: run `loopvol certs rotate` first");
            };
            if let Some(old) = data.insert(CA_CRT.into(), next_crt) {
                data.insert(PREVIOUS_CRT.into(), old);
            }
            data.insert(CA_KEY.into(), next_key);
            Rotated::Promoted
        } else {
            if data.contains_key(NEXT_CRT) {
                bail!(
                    "a CA is already staged in secret {name}: restart the loopvol pods, then run \
                     `loopvol certs rotate --promote`"
                );
            }
            let (crt, key) = new_ca(now, CA_DAYS)?;
            data.insert(NEXT_CRT.into(), crt.into());
            data.insert(NEXT_KEY.into(), key.into());
            Rotated::Staged
        };
        match store.update(name, &data, &s.version) {
            Ok(()) => return Ok(step),
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("secret {name} kept changing while rotating; try again")
}

fn write_file(path: &Path, content: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("write {}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(content)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

mod stores;
#[allow(unused_imports)]
pub use stores::*;
mod cli;
#[allow(unused_imports)]
pub use cli::*;
#[cfg(test)]
mod tests;
