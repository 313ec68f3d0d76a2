//! A throwaway PKI for one control plane: a CA, kube-apiserver's serving
//! certificate, an admin client certificate (group `system:masters`) and the
//! service-account token signing key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::Error;

/// PEM files written into the control plane's directory, and the PEMs a
/// client needs.
pub(crate) struct Pki {
    pub ca_file: PathBuf,
    pub serving_cert_file: PathBuf,
    pub serving_key_file: PathBuf,
    pub sa_key_file: PathBuf,
    pub sa_pub_file: PathBuf,
    pub ca_pem: String,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
}

fn err(e: rcgen::Error) -> Error {
    Error::Other(format!("generating test certificates: {e}"))
}

impl Pki {
    pub(crate) fn write(dir: &Path) -> Result<Pki, Error> {
        let now = time::OffsetDateTime::now_utc();
        let valid = |p: &mut CertificateParams| {
            p.not_before = now - time::Duration::hours(1);
            p.not_after = now + time::Duration::days(365);
        };

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "slipstream-test-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        valid(&mut ca_params);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(err)?)
            .map_err(err)?;

        let serving_key = KeyPair::generate().map_err(err)?;
        let mut serving = CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "10.96.0.1".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
            "kubernetes.default.svc.cluster.local".to_string(),
        ])
        .map_err(err)?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        valid(&mut serving);
        let serving_cert = serving.signed_by(&serving_key, &ca).map_err(err)?;

        let admin_key = KeyPair::generate().map_err(err)?;
        let mut admin = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        admin
            .distinguished_name
            .push(DnType::CommonName, "slipstream-test-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        valid(&mut admin);
        let admin_cert = admin.signed_by(&admin_key, &ca).map_err(err)?;

        let sa_key = KeyPair::generate().map_err(err)?;

        let pki = Pki {
            ca_file: dir.join("ca.crt"),
            serving_cert_file: dir.join("apiserver.crt"),
            serving_key_file: dir.join("apiserver.key"),
            sa_key_file: dir.join("sa.key"),
            sa_pub_file: dir.join("sa.pub"),
            ca_pem: ca.pem(),
            admin_cert_pem: admin_cert.pem(),
            admin_key_pem: admin_key.serialize_pem(),
        };
        std::fs::write(&pki.ca_file, &pki.ca_pem)?;
        std::fs::write(&pki.serving_cert_file, serving_cert.pem())?;
        std::fs::write(&pki.serving_key_file, serving_key.serialize_pem())?;
        std::fs::write(&pki.sa_key_file, sa_key.serialize_pem())?;
        std::fs::write(&pki.sa_pub_file, sa_key.public_key_pem())?;
        Ok(pki)
    }
}
