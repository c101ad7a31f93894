//! `shoal cert`: a private CA for the cluster and the certificates it issues (rcgen).
//!
//! One CA signs every peer's certificate; each certificate names its node id as a DNS name
//! (what the peer transport checks) and is valid as both server and client certificate, so the
//! same pair serves `[cluster.tls]` (mutual TLS) and `[proxy.tls]`.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// What went wrong, naming the file or the argument.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(PathBuf),
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Bad(String, String),
}

/// Days a certificate is valid: 1..=36500.
pub fn check_days(days: u32) -> Result<(), CertError> {
    if (1..=36_500).contains(&days) {
        Ok(())
    } else {
        Err(CertError::Bad(
            "--days".into(),
            format!("must be 1..=36500, got {days}"),
        ))
    }
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // A little slack for clocks behind this one.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
    params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
}

fn bad(what: &str) -> impl FnOnce(rcgen::Error) -> CertError + '_ {
    move |e| CertError::Bad(what.to_string(), e.to_string())
}

/// Write `DIR/ca.pem` and `DIR/ca-key.pem` (mode 0600). Returns the two paths.
pub fn make_ca(out: &Path, days: u32, force: bool) -> Result<[PathBuf; 2], CertError> {
    check_days(days)?;
    let (cert_path, key_path) = (out.join("ca.pem"), out.join("ca-key.pem"));
    refuse_overwrite(&[&cert_path, &key_path], force)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "Shoal cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(bad("key"))?;
    let cert = params.self_signed(&key).map_err(bad("CA certificate"))?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    Ok([cert_path, key_path])
}

/// What `issue` puts in a certificate besides the id.
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

/// Write `OUT/ID.pem` and `OUT/ID-key.pem` (mode 0600), signed by the CA in `ca_dir`.
pub fn issue(
    id: &str,
    ca_dir: &Path,
    out: &Path,
    names: &Names,
    days: u32,
    force: bool,
) -> Result<[PathBuf; 2], CertError> {
    check_days(days)?;
    if !crate::core::pool::valid_node_id(id) {
        return Err(CertError::Bad(
            "ID".into(),
            format!("bad id {id:?} (expected [a-z0-9-]{{1,32}}, as node.id)"),
        ));
    }
    let (ca_pem, ca_key_pem) = (ca_dir.join("ca.pem"), ca_dir.join("ca-key.pem"));
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| CertError::Read(p.into(), e));
    let (ca_text, ca_key_text) = (read(&ca_pem)?, read(&ca_key_pem)?);
    let ca_key = KeyPair::from_pem(&ca_key_text)
        .map_err(|e| CertError::Bad(ca_key_pem.display().to_string(), e.to_string()))?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca_text)
        .map_err(|e| CertError::Bad(ca_pem.display().to_string(), e.to_string()))?;
    // The same subject and key as the CA file: what a verifier matches the issuer by.
    let ca = ca_params
        .self_signed(&ca_key)
        .map_err(|e| CertError::Bad(ca_pem.display().to_string(), e.to_string()))?;

    let (cert_path, key_path) = (
        out.join(format!("{id}.pem")),
        out.join(format!("{id}-key.pem")),
    );
    refuse_overwrite(&[&cert_path, &key_path], force)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, id);
    let mut sans = vec![san_dns(id)?];
    for d in &names.dns {
        if d != id {
            sans.push(san_dns(d)?);
        }
    }
    sans.extend(names.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(bad("key"))?;
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .map_err(bad("certificate"))?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    Ok([cert_path, key_path])
}

fn san_dns(name: &str) -> Result<SanType, CertError> {
    let ia5 = name
        .to_string()
        .try_into()
        .map_err(|_| CertError::Bad("--dns".into(), format!("bad DNS name {name:?}")))?;
    Ok(SanType::DnsName(ia5))
}

fn refuse_overwrite(paths: &[&Path], force: bool) -> Result<(), CertError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) if !force => Err(CertError::Exists(p.to_path_buf())),
        _ => Ok(()),
    }
}

/// Write a file with `mode`, via a temporary file renamed into place (a reader never sees half a
/// key; an existing file is replaced only as a whole).
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let fail = |e| CertError::Write(path.to_path_buf(), e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(data).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

/// The expiry of the first certificate in a PEM file, as seconds since the Unix epoch.
pub fn expiry_of(pem: &Path) -> Option<i64> {
    let text = std::fs::read(pem).ok()?;
    let der = rustls_pemfile::certs(&mut text.as_slice()).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_verify_against_the_ca_and_name_the_id() {
        let dir = tempfile::tempdir().unwrap();
        make_ca(dir.path(), 30, false).unwrap();
        assert!(matches!(
            make_ca(dir.path(), 30, false),
            Err(CertError::Exists(_))
        ));
        let names = Names {
            dns: vec!["shoal-a.example".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
        };
        let [cert, key] = issue("a", dir.path(), dir.path(), &names, 10, false).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let der = std::fs::read(&cert).unwrap();
        let der = rustls_pemfile::certs(&mut der.as_slice())
            .next()
            .unwrap()
            .unwrap();
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let ca = rustls_pemfile::certs(&mut ca.as_slice())
            .next()
            .unwrap()
            .unwrap();
        let anchor = webpki::anchor_from_trusted_cert(&ca).unwrap();
        let ee = webpki::EndEntityCert::try_from(&der).unwrap();
        let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
        let now = rustls::pki_types::UnixTime::now();
        for usage in [
            webpki::KeyUsage::server_auth(),
            webpki::KeyUsage::client_auth(),
        ] {
            ee.verify_for_usage(
                algs.all,
                std::slice::from_ref(&anchor),
                &[],
                now,
                usage,
                None,
                None,
            )
            .unwrap();
        }
        for name in ["a", "shoal-a.example", "127.0.0.1"] {
            let sn = rustls::pki_types::ServerName::try_from(name).unwrap();
            ee.verify_is_valid_for_subject_name(&sn).unwrap();
        }
        let other = rustls::pki_types::ServerName::try_from("b").unwrap();
        assert!(ee.verify_is_valid_for_subject_name(&other).is_err());
        let exp = expiry_of(&cert).unwrap();
        let want = OffsetDateTime::now_utc().unix_timestamp() + 10 * 86_400;
        assert!((exp - want).abs() < 60, "{exp} vs {want}");
        assert!(issue("A", dir.path(), dir.path(), &names, 10, true).is_err());
        assert!(issue("b", dir.path(), dir.path(), &names, 0, false).is_err());
    }
}
