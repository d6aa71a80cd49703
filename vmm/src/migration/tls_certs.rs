//! Throwaway certificates for TLS migration where no PKI exists: the
//! benchmark (`bench migrate --tls`) and the tests. A fresh CA signs one
//! certificate for `localhost` and `127.0.0.1`, which both sides present.

use std::path::Path;

use super::transport::TlsFiles;

/// Writes `PREFIX-ca.pem`, `PREFIX-cert.pem` and `PREFIX-key.pem` (0600) in
/// `dir`: a new CA and a certificate it signed.
pub fn generate(dir: &Path, prefix: &str) -> anyhow::Result<TlsFiles> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("ldt-vmm throwaway CA {prefix}"));
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("ldt-vmm {prefix}"));
    let cert = params.signed_by(&key, &issuer)?;
    let files = TlsFiles {
        cert: dir.join(format!("{prefix}-cert.pem")),
        key: dir.join(format!("{prefix}-key.pem")),
        ca: dir.join(format!("{prefix}-ca.pem")),
    };
    std::fs::write(&files.ca, ca_cert.pem())?;
    std::fs::write(&files.cert, cert.pem())?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&files.key)?
            .write_all(key.serialize_pem().as_bytes())?;
    }
    Ok(files)
}
