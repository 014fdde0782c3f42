//! mTLS configuration for the node pool API (server side) and the router (client side), both
//! from the same three flags: --tls-cert, --tls-key, --tls-ca.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The name every node's server certificate carries, whatever its address (see `certs`).
pub const NODE_SERVER_NAME: &str = "loopvol-node";

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

fn read(p: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("read {}", p.display()))
}

impl TlsFiles {
    fn identity(&self) -> anyhow::Result<Identity> {
        Ok(Identity::from_pem(read(&self.cert)?, read(&self.key)?))
    }

    /// Server side: present our certificate and require a client certificate signed by the CA.
    pub fn server(&self) -> anyhow::Result<ServerTlsConfig> {
        Ok(ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(Certificate::from_pem(read(&self.ca)?))
            .client_auth_optional(false))
    }

    /// Client side: trust only our CA, expect the shared node name, present our identity.
    pub fn client(&self) -> anyhow::Result<ClientTlsConfig> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(self.identity()?)
            .domain_name(NODE_SERVER_NAME))
    }
}
