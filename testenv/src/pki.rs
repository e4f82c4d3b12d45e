//! The control plane's certificates: one CA, the API server's serving cert,
//! client certs for each identity, and the service-account signing key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::Error;

/// A certificate and key written as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Every file the components need, under one directory.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca: CertFiles,
    pub serving: CertFiles,
    pub admin: CertFiles,
    pub controller_manager: CertFiles,
    pub scheduler: CertFiles,
    /// The key service-account tokens are signed with, and its public half.
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn tls(e: rcgen::Error) -> Error {
    Error::Setup(format!("generating certificates: {e}"))
}

impl Pki {
    pub fn generate(dir: &Path) -> Result<Pki, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating the pki dir", e))?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "edgewire-testenv-ca");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().map_err(tls)?;
        let ca_key_pem = ca_key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(tls)?;
        let ca_files = CertFiles {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
        };
        write(&ca_files.cert, &ca.pem())?;
        write(&ca_files.key, &ca_key_pem)?;

        let issue = |name: &str,
                     sans: Vec<String>,
                     cn: &str,
                     org: Option<&str>,
                     usage: ExtendedKeyUsagePurpose|
         -> Result<CertFiles, Error> {
            let mut params = CertificateParams::new(sans).map_err(tls)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            if let Some(org) = org {
                params
                    .distinguished_name
                    .push(DnType::OrganizationName, org);
            }
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().map_err(tls)?;
            let cert = params.signed_by(&key, &ca).map_err(tls)?;
            let files = CertFiles {
                cert: dir.join(format!("{name}.crt")),
                key: dir.join(format!("{name}.key")),
            };
            write(&files.cert, &cert.pem())?;
            write(&files.key, &key.serialize_pem())?;
            Ok(files)
        };
        let serving = issue(
            "apiserver",
            vec![
                "localhost".into(),
                "127.0.0.1".into(),
                "kubernetes".into(),
                "kubernetes.default.svc".into(),
            ],
            "kube-apiserver",
            None,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let client = ExtendedKeyUsagePurpose::ClientAuth;
        let admin = issue(
            "admin",
            vec![],
            "edgewire-testenv-admin",
            Some("system:masters"),
            client.clone(),
        )?;
        let controller_manager = issue(
            "controller-manager",
            vec![],
            "system:kube-controller-manager",
            None,
            client.clone(),
        )?;
        let scheduler = issue("scheduler", vec![], "system:kube-scheduler", None, client)?;

        let service_account_key = dir.join("service-account.key");
        let service_account_pub = dir.join("service-account.pub");
        let sa = KeyPair::generate().map_err(tls)?;
        write(&service_account_key, &sa.serialize_pem())?;
        write(&service_account_pub, &sa.public_key_pem())?;
        Ok(Pki {
            ca: ca_files,
            serving,
            admin,
            controller_manager,
            scheduler,
            service_account_key,
            service_account_pub,
        })
    }
}
