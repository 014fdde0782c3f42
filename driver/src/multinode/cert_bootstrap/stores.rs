//! Where the CA is kept: a directory (tests, machines without Kubernetes) or a Secret.

use super::*;

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

pub(super) fn kube_err(name: &str, e: kube::Error) -> StoreError {
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
