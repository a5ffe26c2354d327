//! Deciding that a remote is the real one: its certificate matches a pin or the
//! known-remotes file, or verifies against a CA. In every case the handshake signature is
//! verified with the certificate's key, so a copied certificate without its key fails.

use super::{Error, Fingerprint, KnownRemotes, Trust};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// How a changed identity's refusal starts: log lines that carry it are errors, not notes.
pub const IDENTITY_CHANGED: &str = "WARNING: REMOTE IDENTITY HAS CHANGED";

/// Why local-proxy refused a remote's identity: each case says what was seen and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `--pin` was given and the certificate matches none of the pins.
    NotPinned {
        /// The remote as configured (`HOST:PORT`).
        remote: String,
        /// The identity it presented.
        seen: Fingerprint,
    },
    /// The remote is not in the known-remotes file.
    Unknown {
        /// The remote as configured (`HOST:PORT`).
        remote: String,
        /// The identity it presented.
        seen: Fingerprint,
        /// The known-remotes file.
        file: PathBuf,
    },
    /// The remote is in the known-remotes file with another identity.
    Changed {
        /// The remote as configured (`HOST:PORT`).
        remote: String,
        /// The identity it presented.
        seen: Fingerprint,
        /// The identities the file records for it.
        known: Vec<Fingerprint>,
        /// The known-remotes file.
        file: PathBuf,
    },
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::NotPinned { remote, seen } => write!(
                f,
                "remote {remote} presented identity {seen}, which matches no --pin: refused"
            ),
            Refused::Unknown { remote, seen, file } => write!(
                f,
                "remote {remote} is not a known remote (its identity is {seen}); if the \
                 operator gave you that identity, trust it with `local-proxy trust {remote}` \
                 (known remotes: {})",
                file.display()
            ),
            Refused::Changed {
                remote,
                seen,
                known,
                file,
            } => {
                let known: Vec<String> = known.iter().map(|k| k.to_string()).collect();
                write!(
                    f,
                    "{IDENTITY_CHANGED} for {remote}: it presented {seen}, but {} records {}. \
                     Someone may be intercepting the connection, or the remote's key was \
                     replaced. Refused. If the operator confirms the new identity, run \
                     `local-proxy trust {remote}`",
                    file.display(),
                    known.join(", ")
                )
            }
        }
    }
}

impl std::error::Error for Refused {}

/// The verifier for `remote` under `trust`.
pub(super) fn for_remote(
    trust: &Trust,
    remote: &str,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, Error> {
    let algs = provider.signature_verification_algorithms;
    Ok(match trust {
        Trust::Pins(pins) => Arc::new(ByIdentity {
            remote: remote.to_string(),
            check: Check::Pins(pins.clone()),
            algs,
        }),
        Trust::Known(k) => Arc::new(ByIdentity {
            remote: remote.to_string(),
            check: Check::Known(Arc::clone(k)),
            algs,
        }),
        Trust::Note(slot) => Arc::new(ByIdentity {
            remote: remote.to_string(),
            check: Check::Note(Arc::clone(slot)),
            algs,
        }),
        Trust::Ca(path) => {
            let mut roots = RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| Error::Pem(path.clone(), e.to_string()))?;
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(Error::Pem(path.clone(), "no usable CA certificate".into()));
            }
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Config(e.to_string()))?
        }
    })
}

#[derive(Debug)]
enum Check {
    Pins(Vec<Fingerprint>),
    Known(Arc<KnownRemotes>),
    Note(Arc<parking_lot::Mutex<Option<Fingerprint>>>),
}

/// Accepts a certificate by its hash (a pin, or the known-remotes file) rather than by a
/// chain: remote-proxy's own certificate is self-signed.
#[derive(Debug)]
struct ByIdentity {
    remote: String,
    check: Check,
    algs: WebPkiSupportedAlgorithms,
}

impl ByIdentity {
    fn judge(&self, seen: Fingerprint) -> Result<(), Refused> {
        let remote = self.remote.clone();
        match &self.check {
            Check::Pins(pins) if pins.contains(&seen) => Ok(()),
            Check::Pins(_) => Err(Refused::NotPinned { remote, seen }),
            Check::Note(slot) => {
                *slot.lock() = Some(seen);
                Ok(())
            }
            Check::Known(k) => {
                let mut known = k.lookup(&self.remote);
                if !known.contains(&seen) {
                    // Perhaps trusted since this local-proxy started.
                    k.reload();
                    known = k.lookup(&self.remote);
                }
                if known.contains(&seen) {
                    Ok(())
                } else if known.is_empty() {
                    Err(Refused::Unknown {
                        remote,
                        seen,
                        file: k.path().to_path_buf(),
                    })
                } else {
                    Err(Refused::Changed {
                        remote,
                        seen,
                        known,
                        file: k.path().to_path_buf(),
                    })
                }
            }
        }
    }
}

impl ServerCertVerifier for ByIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.judge(Fingerprint::of(end_entity))
            .map(|()| ServerCertVerified::assertion())
            .map_err(|r| rustls::Error::Other(rustls::OtherError(Arc::new(r))))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered, so a 1.2 handshake cannot reach here.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(check: Check) -> ByIdentity {
        ByIdentity {
            remote: "r.example:7080".into(),
            check,
            algs: super::super::provider().signature_verification_algorithms,
        }
    }

    #[test]
    fn any_matching_pin_passes_and_others_are_named() {
        let (a, b, c) = (
            Fingerprint([1; 32]),
            Fingerprint([2; 32]),
            Fingerprint([3; 32]),
        );
        let v = verifier(Check::Pins(vec![a, b]));
        assert_eq!(v.judge(a), Ok(()));
        assert_eq!(v.judge(b), Ok(()));
        let r = v.judge(c).unwrap_err();
        assert!(matches!(r, Refused::NotPinned { seen, .. } if seen == c));
        assert!(r.to_string().contains(&c.to_string()));
    }

    #[test]
    fn unknown_and_changed_remotes_are_told_apart() {
        let dir = std::env::temp_dir().join(format!("flowgate-verify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let known = Arc::new(KnownRemotes::open(&dir.join("known")).unwrap());
        let v = verifier(Check::Known(Arc::clone(&known)));
        let (a, b) = (Fingerprint([1; 32]), Fingerprint([2; 32]));
        let unknown = v.judge(a).unwrap_err();
        assert!(matches!(unknown, Refused::Unknown { .. }), "{unknown}");
        assert!(unknown
            .to_string()
            .contains("local-proxy trust r.example:7080"));
        // Trusted by another process while this one runs: seen without a restart.
        KnownRemotes::open(&dir.join("known"))
            .unwrap()
            .record("r.example:7080", a)
            .unwrap();
        assert_eq!(v.judge(a), Ok(()));
        let changed = v.judge(b).unwrap_err();
        assert!(matches!(changed, Refused::Changed { .. }), "{changed}");
        assert!(changed.to_string().contains("HAS CHANGED"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
