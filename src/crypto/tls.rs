//! TLS between members. Every member derives the same certificate authority from the
//! ring secret (an Ed25519 key from HKDF of the secret) and signs a fresh certificate
//! for itself at start. Both ends of every connection present their certificate and
//! check the other's against that authority (mutual TLS 1.3), so only holders of the
//! secret can connect, and a network observer sees ciphertext.

use super::secret::RingSecret;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// The name every member's certificate carries and every client checks (peers are
/// reached by address, so the ring authority, not the name, is what identifies them).
pub const SERVER_NAME: &str = "peer.mutualstore";

/// PKCS#8 v1 wrapping of an Ed25519 seed (RFC 8410): a fixed prefix, then the 32 bytes.
const ED25519_PKCS8_PREFIX: [u8; 16] = [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

pub struct RingTls {
    pub ring_id: String,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    server: Arc<rustls::ServerConfig>,
    /// What a direct-lane connection to another member uses (`rpc::lane`).
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for RingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RingTls(ring {})", self.ring_id)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl RingTls {
    pub fn new(secret: &RingSecret) -> Result<RingTls, String> {
        let err = |e: rcgen::Error| format!("cannot make the ring's certificates: {e}");
        let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
        pkcs8.extend_from_slice(&secret.derive("mutualstore ring CA key v1"));
        let ca_key = KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(pkcs8), &rcgen::PKCS_ED25519).map_err(err)?;
        let ring_id = secret.ring_id();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, format!("MutualStore ring {ring_id}"));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(err)?;
        let mut leaf = CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(err)?;
        leaf.distinguished_name.push(DnType::CommonName, "MutualStore member");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = leaf.signed_by(&key, &issuer).map_err(err)?;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).map_err(|e| format!("ring authority: {e}"))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| format!("client verifier: {e}"))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
            .map_err(|e| format!("TLS: {e}"))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client_roots = rustls::RootCertStore::empty();
        client_roots.add(ca_cert.der().clone()).map_err(|e| format!("ring authority: {e}"))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(client_roots)
            .with_client_auth_cert(vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
            .map_err(|e| format!("TLS: {e}"))?;
        Ok(RingTls {
            ring_id,
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }

    /// What a direct-lane connection to another member uses.
    pub fn lane_client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// What a gRPC channel to another member uses.
    pub fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(SERVER_NAME)
            .assume_http2(true)
    }
}

/// Turns a failed call's error chain into one line and says what it most likely means.
pub fn explain(chain: &str, have_secret: bool) -> Option<&'static str> {
    let c = chain.to_ascii_lowercase();
    if have_secret {
        if c.contains("certificate") || c.contains("unknownca") || c.contains("decrypt") || c.contains("alert") {
            return Some("the peer does not accept our ring secret (another ring's secret?)");
        }
        if c.contains("corrupt message") || c.contains("invalidcontenttype") || c.contains("invalid content type") {
            return Some("the peer does not speak TLS: it runs a ring without a secret");
        }
    } else if c.contains("connection reset") || c.contains("broken pipe") || c.contains("connection closed") || c.contains("h2 protocol error") || c.contains("unexpected eof") {
        return Some("the ring may require its secret: pass --secret-file or set MUTUALSTORE_SECRET");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_of_one_ring_share_an_authority_and_not_with_another() {
        let s = RingSecret::generate();
        let a = RingTls::new(&s).unwrap();
        let b = RingTls::new(&s).unwrap();
        assert_eq!(a.ring_id, b.ring_id);
        assert_ne!(a.cert_pem, b.cert_pem, "each member signs its own certificate");
        let c = RingTls::new(&RingSecret::generate()).unwrap();
        assert_ne!(a.ring_id, c.ring_id);
        assert!(!a.key_pem.is_empty());
    }
}
