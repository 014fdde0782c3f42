//! `loopvol certs`: its arguments and what each action does.

use super::*;

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
            crate::multinode::certs::write(&out, &a.namespace)?;
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
