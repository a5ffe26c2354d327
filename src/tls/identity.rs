//! remote-proxy's TLS identity: a key pair and certificate made on first start and kept in
//! the state directory, or the operator's own files.

use super::{Error, Fingerprint};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The generated key's file name in the state directory.
pub const IDENTITY_KEY: &str = "identity.key";
/// The generated certificate's file name in the state directory.
pub const IDENTITY_CERT: &str = "identity.crt";

/// A certificate chain (end-entity first) and its private key.
#[derive(Debug)]
pub struct Identity {
    /// The certificates sent to clients, end-entity first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The end-entity certificate's private key.
    pub key: PrivateKeyDer<'static>,
    /// Of the end-entity certificate: what users pin.
    pub fingerprint: Fingerprint,
}

impl Identity {
    /// The identity kept in `dir`, made (and written, owner-only) when there is none yet.
    /// Returns whether it was made now.
    ///
    /// # Errors
    /// `Io` when the files cannot be read or written, `Pem` when they hold no usable
    /// certificate or key, or when only one of the two exists (a half-written identity is
    /// not silently replaced: users may have pinned the old one).
    pub fn load_or_create(dir: &Path) -> Result<(Identity, bool), Error> {
        let key = dir.join(IDENTITY_KEY);
        let cert = dir.join(IDENTITY_CERT);
        match (key.exists(), cert.exists()) {
            (true, true) => Identity::load(&cert, &key).map(|i| (i, false)),
            (false, false) => Identity::create(dir, &cert, &key).map(|i| (i, true)),
            (true, false) => Err(Error::Pem(
                cert,
                format!(
                    "missing, but {} exists: restore it or remove both",
                    key.display()
                ),
            )),
            (false, true) => Err(Error::Pem(
                key,
                format!(
                    "missing, but {} exists: restore it or remove both",
                    cert.display()
                ),
            )),
        }
    }

    /// The operator's own certificate chain and key (PEM).
    ///
    /// # Errors
    /// `Io` when a file cannot be read, `Pem` when it holds no certificate or key.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, Error> {
        warn_if_readable_by_others(key);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_error(cert, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem_error(cert, e))?;
        let Some(first) = chain.first() else {
            return Err(Error::Pem(
                cert.to_path_buf(),
                "no certificate in it".into(),
            ));
        };
        let fingerprint = Fingerprint::of(first);
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e))?;
        Ok(Identity {
            chain,
            key,
            fingerprint,
        })
    }

    fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<Identity, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(dir.to_path_buf(), e))?;
        let made = rcgen::generate_simple_self_signed(vec!["flowgate-remote".to_string()])
            .map_err(|e| Error::Generate(e.to_string()))?;
        // Written under names of this process, then linked into place: a crash leaves no
        // half identity, and of two first starts at once only one identity wins (linking
        // fails when the name exists), which both then use.
        let tag = format!("tmp.{}", std::process::id());
        let tmp_key = dir.join(format!("{IDENTITY_KEY}.{tag}"));
        let tmp_cert = dir.join(format!("{IDENTITY_CERT}.{tag}"));
        write_private(&tmp_key, made.key_pair.serialize_pem().as_bytes())?;
        write_private(&tmp_cert, made.cert.pem().as_bytes())?;
        let linked = std::fs::hard_link(&tmp_key, key_path);
        let cert_linked = match &linked {
            Ok(()) => std::fs::hard_link(&tmp_cert, cert_path),
            Err(_) => Ok(()),
        };
        let _ = std::fs::remove_file(&tmp_key);
        let _ = std::fs::remove_file(&tmp_cert);
        match linked {
            Ok(()) => cert_linked.map_err(|e| Error::Io(cert_path.into(), e))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Another process made it first: wait for its certificate to appear. It is
                // written by that process, so nothing here can signal it: a short poll of
                // the file, a second at most, once per first start.
                for _ in 0..50 {
                    if cert_path.exists() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            Err(e) => return Err(Error::Io(key_path.into(), e)),
        }
        Identity::load(cert_path, key_path)
    }
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> Error {
    match e {
        rustls::pki_types::pem::Error::Io(io) => Error::Io(path.to_path_buf(), io),
        rustls::pki_types::pem::Error::NoItemsFound => Error::Pem(
            path.to_path_buf(),
            "no PEM item of the expected kind".into(),
        ),
        other => Error::Pem(path.to_path_buf(), other.to_string()),
    }
}

/// Writes `bytes` to a new file that only its owner can read (mode 0600 from creation, so
/// the key is never readable by others, not even for a moment).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io = |e| Error::Io(PathBuf::from(path), e);
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

fn warn_if_readable_by_others(key: &Path) {
    if let Ok(meta) = std::fs::metadata(key) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            log::warn!(
                "TLS key {} is readable by others (mode {:o}): chmod 600 it",
                key.display(),
                mode & 0o777
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flowgate-id-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn an_identity_is_made_once_owner_only_and_reused() {
        let dir = temp_dir("reuse");
        let (first, made) = Identity::load_or_create(&dir).unwrap();
        assert!(made);
        for f in [IDENTITY_KEY, IDENTITY_CERT] {
            let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let (again, made) = Identity::load_or_create(&dir).unwrap();
        assert!(!made);
        assert_eq!(again.fingerprint, first.fingerprint);
        assert_eq!(Fingerprint::of(&again.chain[0]), first.fingerprint);
        super::super::server_config(&again).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn half_an_identity_is_an_error_not_replaced() {
        let dir = temp_dir("half");
        Identity::load_or_create(&dir).unwrap();
        std::fs::remove_file(dir.join(IDENTITY_CERT)).unwrap();
        let err = Identity::load_or_create(&dir).unwrap_err().to_string();
        assert!(
            err.contains("identity.crt") && err.contains("missing"),
            "{err}"
        );
        assert!(dir.join(IDENTITY_KEY).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_without_pem_are_refused_clearly() {
        let dir = temp_dir("bad");
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&c, "not a certificate").unwrap();
        std::fs::write(&k, "not a key").unwrap();
        let err = Identity::load(&c, &k).unwrap_err().to_string();
        assert!(err.contains("c.pem"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
