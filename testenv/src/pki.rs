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
    /// The API server's identity towards kubelets (logs, exec, port-forward).
    pub kubelet_client: CertFiles,
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

/// The CA's parameters: the same every time, so a certificate issued later
/// (a real node's) from the CA key on disk names the same issuer.
fn ca_params() -> Result<CertificateParams, Error> {
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
    Ok(ca_params)
}

/// A certificate for `sans`/`cn`/`org` signed by `issuer`, written as
/// `dir/name.{crt,key}`.
fn issue_with<S: rcgen::SigningKey>(
    issuer: &rcgen::Issuer<'_, S>,
    dir: &Path,
    name: &str,
    sans: Vec<String>,
    cn: &str,
    org: Option<&str>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertFiles, Error> {
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
    let cert = params.signed_by(&key, issuer).map_err(tls)?;
    let files = CertFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    write(&files.cert, &cert.pem())?;
    write(&files.key, &key.serialize_pem())?;
    Ok(files)
}

impl Pki {
    /// A client certificate from this CA, e.g. a kubelet's
    /// (`system:node:NAME` in `system:nodes`), written in `dir`.
    pub fn issue_client(
        &self,
        dir: &Path,
        name: &str,
        cn: &str,
        org: Option<&str>,
    ) -> Result<CertFiles, Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let pem = std::fs::read_to_string(&self.ca.key)
            .map_err(|e| Error::io(format!("reading {}", self.ca.key.display()), e))?;
        let key = KeyPair::from_pem(&pem).map_err(tls)?;
        let issuer = rcgen::Issuer::new(ca_params()?, key);
        issue_with(
            &issuer,
            dir,
            name,
            vec![],
            cn,
            org,
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// The CA, the API server's serving certificate (for loopback, the
    /// `kubernetes` Service's first address and names, and `extra_sans`, the
    /// address real nodes reach it on) and every client identity.
    pub fn generate(dir: &Path, extra_sans: &[String]) -> Result<Pki, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating the pki dir", e))?;
        let ca_params = ca_params()?;
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
                     usage: ExtendedKeyUsagePurpose| {
            issue_with(&ca, dir, name, sans, cn, org, usage)
        };
        let mut serving_sans: Vec<String> = [
            "localhost",
            "127.0.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            // The `kubernetes` Service's address, which pods connect to.
            crate::controlplane::KUBERNETES_SERVICE_IP,
        ]
        .into_iter()
        .map(String::from)
        .collect();
        serving_sans.extend(extra_sans.iter().cloned());
        let serving = issue(
            "apiserver",
            serving_sans,
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
        let scheduler = issue(
            "scheduler",
            vec![],
            "system:kube-scheduler",
            None,
            client.clone(),
        )?;
        let kubelet_client = issue(
            "apiserver-kubelet-client",
            vec![],
            "kube-apiserver-kubelet-client",
            Some("system:masters"),
            client,
        )?;

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
            kubelet_client,
            service_account_key,
            service_account_pub,
        })
    }
}
