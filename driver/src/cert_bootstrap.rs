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

use crate::certs::NODE_SERVER_NAME;

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
        Role::Node => (
            NODE_SERVER_NAME,
            vec![NODE_SERVER_NAME.to_string()],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        Role::Router => (
            "loopvol-router",
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    };
    let issuer = Issuer::from_ca_cert_pem(
        ca_crt,
        KeyPair::from_pem(ca_key).context("the CA key does not parse")?,
    )
    .context("the CA certificate does not parse")?;
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![usage];
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

// ------------------------------------------------------------------ stores

/// A directory per Secret, one file per key, and a `.version` counter; a lock file serializes
/// writers. For tests and for machines without Kubernetes.
pub struct DirStore {
    pub root: PathBuf,
}

impl DirStore {
    fn lock(&self) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("create {}", self.root.display()))?;
        let f = std::fs::File::create(self.root.join(".lock"))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("lock {}: {e}", self.root.display()))
    }

    fn dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        if name.is_empty() || name.starts_with('.') || name.contains('/') {
            bail!("{name:?} is not a secret name");
        }
        Ok(self.root.join(name))
    }

    fn write(&self, name: &str, data: &SecretData, version: u64) -> anyhow::Result<()> {
        let dir = self.dir(name)?;
        let tmp = self.root.join(format!(".{name}.new"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp)?;
        for (k, v) in data {
            if k.starts_with('.') || k.contains('/') {
                bail!("{k:?} is not a secret key");
            }
            write_file(&tmp.join(k), v, 0o600)?;
        }
        write_file(&tmp.join(".version"), version.to_string().as_bytes(), 0o600)?;
        let old = self.root.join(format!(".{name}.old"));
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(&dir, &old)?;
        }
        std::fs::rename(&tmp, &dir)?;
        let _ = std::fs::remove_dir_all(&old);
        std::fs::File::open(&self.root)?.sync_all()?;
        Ok(())
    }
}

impl SecretStore for DirStore {
    fn get(&self, name: &str) -> Result<Option<Stored>, StoreError> {
        let dir = self.dir(name)?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow::Error::from(e).into()),
        };
        let mut data = SecretData::new();
        let mut version = String::new();
        for e in entries {
            let e = e.map_err(anyhow::Error::from)?;
            let key = e.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(e.path()).map_err(anyhow::Error::from)?;
            if key == ".version" {
                version = String::from_utf8_lossy(&bytes).into_owned();
            } else {
                data.insert(key, bytes);
            }
        }
        Ok(Some(Stored { data, version }))
    }

    fn create(&self, name: &str, data: &SecretData) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        if self.dir(name)?.exists() {
            return Err(StoreError::AlreadyExists(name.into()));
        }
        self.write(name, data, 1)?;
        Ok(())
    }

    fn update(&self, name: &str, data: &SecretData, version: &str) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        let current = self
            .get(name)?
            .ok_or_else(|| StoreError::Other(anyhow::anyhow!("secret {name} does not exist")))?;
        if current.version != version {
            return Err(StoreError::Conflict(name.into()));
        }
        let next = version.parse::<u64>().unwrap_or(0) + 1;
        self.write(name, data, next)?;
        Ok(())
    }
}

/// The Kubernetes API: one Secret in one namespace (the Role in manifests/rbac.yaml grants
/// exactly that). Blocking calls over a private runtime, as the CLI is synchronous.
pub struct KubeStore {
    api: kube::Api<k8s_openapi::api::core::v1::Secret>,
    rt: tokio::runtime::Runtime,
}

impl KubeStore {
    pub fn connect(namespace: &str) -> anyhow::Result<KubeStore> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = rt
            .block_on(kube::Client::try_default())
            .context("connect to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
        Ok(KubeStore {
            api: kube::Api::namespaced(client, namespace),
            rt,
        })
    }

    fn secret(
        name: &str,
        data: &SecretData,
        version: Option<&str>,
    ) -> k8s_openapi::api::core::v1::Secret {
        use k8s_openapi::ByteString;
        k8s_openapi::api::core::v1::Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                resource_version: version.map(Into::into),
                labels: Some(
                    [
                        ("app.kubernetes.io/name".to_string(), "loopvol".to_string()),
                        ("app.kubernetes.io/part-of".into(), "loopvol".into()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                    .collect(),
            ),
            ..Default::default()
        }
    }
}

fn kube_err(name: &str, e: kube::Error) -> StoreError {
    match &e {
        kube::Error::Api(s) if s.is_already_exists() => StoreError::AlreadyExists(name.into()),
        kube::Error::Api(s) if s.is_conflict() => StoreError::Conflict(name.into()),
        _ => StoreError::Other(anyhow::Error::from(e).context(format!("secret {name}"))),
    }
}

impl SecretStore for KubeStore {
    fn get(&self, name: &str) -> Result<Option<Stored>, StoreError> {
        let s = self
            .rt
            .block_on(self.api.get_opt(name))
            .map_err(|e| kube_err(name, e))?;
        Ok(s.map(|s| Stored {
            version: s.metadata.resource_version.unwrap_or_default(),
            data: s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
        }))
    }

    fn create(&self, name: &str, data: &SecretData) -> Result<(), StoreError> {
        self.rt
            .block_on(
                self.api
                    .create(&Default::default(), &Self::secret(name, data, None)),
            )
            .map_err(|e| kube_err(name, e))?;
        Ok(())
    }

    fn update(&self, name: &str, data: &SecretData, version: &str) -> Result<(), StoreError> {
        self.rt
            .block_on(self.api.replace(
                name,
                &Default::default(),
                &Self::secret(name, data, Some(version)),
            ))
            .map_err(|e| kube_err(name, e))?;
        Ok(())
    }
}

// ------------------------------------------------------------------ CLI

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub action: Option<CertsAction>,
    /// Write a CA (with its key), node and router certificates and secret.yaml into DIR: the
    /// by-hand alternative to `bootstrap`, for clusters that manage the Secret themselves.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Namespace of the generated Secret and of the snapshot-metadata Service.
    #[arg(long, default_value = "loopvol-system")]
    pub namespace: String,
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The Secret that keeps the CA.
    #[arg(long, default_value = "loopvol-ca")]
    pub secret: String,
    /// Its namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "loopvol-system")]
    pub namespace: String,
    /// Keep the CA in this directory instead of a Kubernetes Secret.
    #[arg(long, value_name = "DIR")]
    pub store_dir: Option<PathBuf>,
}

impl StoreArgs {
    fn open(&self) -> anyhow::Result<Box<dyn SecretStore>> {
        Ok(match &self.store_dir {
            Some(root) => Box::new(DirStore { root: root.clone() }),
            None => Box::new(KubeStore::connect(&self.namespace)?),
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum CertsAction {
    /// Create the CA Secret if missing, then issue this pod's certificate from it into --out
    /// (tls.crt, tls.key, ca.crt). Run by the init container of every loopvol pod.
    Bootstrap {
        #[command(flatten)]
        store: StoreArgs,
        /// Which certificate to issue.
        #[arg(long, value_enum)]
        role: Role,
        /// Directory to write tls.crt, tls.key and ca.crt into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Lifetime of the issued certificate; every pod restart issues a new one.
        #[arg(long, value_name = "DAYS", default_value_t = LEAF_DAYS, value_parser = clap::value_parser!(i64).range(1..=3650))]
        leaf_days: i64,
    },
    /// Rotate the CA in two steps: stage a new one (then restart the loopvol pods), and with
    /// --promote make it the signing CA (then restart them again).
    Rotate {
        #[command(flatten)]
        store: StoreArgs,
        /// Second step: the staged CA starts signing; the old one stays trusted.
        #[arg(long)]
        promote: bool,
    },
    /// Print the validity of the CA certificates kept in the Secret.
    Show {
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub fn main(a: CertsArgs) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    let rfc3339 = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| t.to_string())
    };
    match a.action {
        None => {
            let Some(out) = a.out else {
                bail!("give --out DIR, or one of: bootstrap, rotate, show (see --help)");
            };
            crate::certs::write(&out, &a.namespace)?;
            println!(
                "wrote ca.crt, ca.key, server.crt, server.key, client.crt, client.key and \
                 secret.yaml to {}, and the snapshot-metadata sidecar's tls.crt, tls.key and \
                 snapshotmetadataservice.yaml to {}; keep ca.key to issue more later",
                out.display(),
                out.join("snapshot-metadata").display()
            );
        }
        Some(CertsAction::Bootstrap {
            store,
            role,
            out,
            leaf_days,
        }) => {
            let issued = bootstrap(&*store.open()?, &store.secret, role, &out, now, leaf_days)?;
            println!(
                "issued the {role:?} certificate into {} (valid until {}); CA valid until {}; \
                 {} CA certificate(s) trusted",
                out.display(),
                rfc3339(issued.leaf_not_after),
                rfc3339(issued.ca_not_after),
                issued.trusted
            );
        }
        Some(CertsAction::Rotate { store, promote }) => {
            match rotate(&*store.open()?, &store.secret, promote, now)? {
                Rotated::Staged => println!(
                    "staged a new CA in secret {}/{}. Next: restart the loopvol pods \
                     (kubectl -n {ns} rollout restart daemonset/loopvol-node \
                     deployment/loopvol-controller), wait for the rollouts, then run \
                     `loopvol certs rotate --promote`",
                    store.namespace,
                    store.secret,
                    ns = store.namespace
                ),
                Rotated::Promoted => println!(
                    "the new CA now signs; the old one stays trusted. Next: restart the loopvol \
                     pods again so that every certificate comes from the new CA"
                ),
            }
        }
        Some(CertsAction::Show { store }) => {
            let Some(s) = store.open()?.get(&store.secret)? else {
                bail!("secret {}/{} does not exist", store.namespace, store.secret);
            };
            for (k, role) in [
                (CA_CRT, "signing"),
                (NEXT_CRT, "staged"),
                (PREVIOUS_CRT, "previous"),
            ] {
                if let Some(pem) = text(&s.data, k) {
                    println!("{role:<9} CA valid until {}", rfc3339(not_after(pem)?));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
                        bootstrap(&DirStore { root }, "loopvol-ca", Role::Node, &out, now, 30)
                            .unwrap();
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
}
