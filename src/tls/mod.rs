//! TLS 1.3 between local-proxy and remote-proxy: remote-proxy's identity (identity.rs), how
//! local-proxy decides a remote is the real one (verify.rs: pins, a CA, or the known-remotes
//! file of known.rs), and the rustls configurations both sides use.
//!
//! The tunnel protocol runs unchanged inside TLS (docs/protocol.md §4). Only TLS 1.3 is
//! offered: both ends are flowgate, so there is no older peer to be compatible with.

mod identity;
mod known;
mod verify;

pub use identity::{Identity, IDENTITY_CERT, IDENTITY_KEY};
pub use known::{default_known_remotes_path, KnownRemotes};
pub use verify::{Refused, IDENTITY_CHANGED};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// ALPN protocol of a tunnel connection: a TLS server that is not remote-proxy (or a
/// remote-proxy that speaks another tunnel version) fails the handshake instead of being
/// sent credentials.
pub const ALPN_TUNNEL: &[u8] = b"flowgate/2";
/// ALPN protocol of a health-probe connection: remote-proxy can tell a probe from the
/// cleartext ClientHello, so it answers probes without a slot while its queue is full.
pub const ALPN_HEALTH: &[u8] = b"flowgate-health/2";

/// SHA-256 of a certificate's DER encoding: how a remote's identity is named, pinned and
/// recorded (`sha256:<64 hex digits>`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(der: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = String;

    /// `sha256:` and 64 hex digits (either case; colons between bytes are allowed, as
    /// `openssl x509 -fingerprint -sha256` prints them).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a fingerprint: expected sha256:<64 hex digits>");
        let hex = s
            .strip_prefix("sha256:")
            .or_else(|| s.strip_prefix("SHA256:"))
            .ok_or_else(bad)?;
        let digits: Vec<u8> = hex.bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

/// Why TLS could not be set up (at start: bad files, an unusable key).
#[derive(Debug)]
pub enum Error {
    /// A file could not be read, written or created.
    Io(PathBuf, std::io::Error),
    /// A file holds no usable certificate or key.
    Pem(PathBuf, String),
    /// The key pair could not be generated.
    Generate(String),
    /// rustls refused the certificate, key or CA bundle.
    Config(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(p, e) => write!(f, "{}: {e}", p.display()),
            Error::Pem(p, e) => write!(f, "{}: {e}", p.display()),
            Error::Generate(e) => write!(f, "cannot generate a TLS key: {e}"),
            Error::Config(e) => write!(f, "TLS setup failed: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// The crypto both sides use: ring, TLS 1.3 suites only, AES-128-GCM first (the fastest
/// on CPUs with AES instructions, and as strong as the hop needs).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// remote-proxy's configuration: its identity, tunnel and probe ALPN.
///
/// # Errors
/// `Config` when rustls refuses the certificate or key (say, a key that does not match).
pub fn server_config(identity: &Identity) -> Result<Arc<ServerConfig>, Error> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| Error::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN_TUNNEL.to_vec(), ALPN_HEALTH.to_vec()];
    Ok(Arc::new(cfg))
}

/// How local-proxy decides that a remote is the real one.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The remote's certificate must hash to one of these.
    Pins(Vec<Fingerprint>),
    /// The remote's chain and host name must verify against this CA bundle.
    Ca(PathBuf),
    /// The remote must be recorded in the known-remotes file (`local-proxy trust`).
    Known(Arc<KnownRemotes>),
    /// Any identity passes and is noted here: only for `local-proxy trust`, which shows it
    /// to the user and sends nothing over the connection. The handshake signature is still
    /// checked, so the noted identity is one the remote holds the key of.
    Note(Arc<parking_lot::Mutex<Option<Fingerprint>>>),
}

impl Trust {
    /// One word for log lines: how remotes are verified.
    pub fn describe(&self) -> String {
        match self {
            Trust::Pins(p) => format!("pinned ({} pins)", p.len()),
            Trust::Ca(path) => format!("ca {}", path.display()),
            Trust::Known(k) => format!("known-remotes {}", k.path().display()),
            Trust::Note(_) => "noting the identity".into(),
        }
    }
}

/// What local-proxy dials one remote with: its TLS configuration and the name it checks.
#[derive(Clone, Debug)]
pub struct Dial {
    pub(crate) tunnel: Arc<ClientConfig>,
    pub(crate) health: Arc<ClientConfig>,
    pub(crate) name: ServerName<'static>,
}

impl Dial {
    /// The configuration and server name tunnel connections use (for tests and tools that
    /// drive a connection by hand).
    pub fn for_tunnels(&self) -> (&Arc<ClientConfig>, &ServerName<'static>) {
        (&self.tunnel, &self.name)
    }

    /// As [`for_tunnels`](Self::for_tunnels), for health probes.
    pub fn for_probes(&self) -> (&Arc<ClientConfig>, &ServerName<'static>) {
        (&self.health, &self.name)
    }
}

/// The client configurations for the remote `remote` (`HOST:PORT`) under `trust`.
///
/// # Errors
/// `Pem`/`Io` when the CA bundle cannot be read, `Config` for a bad host name.
pub fn dial(trust: &Trust, remote: &str) -> Result<Dial, Error> {
    let host = host_of(remote);
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| Error::Config(format!("{host:?} is not a valid host name for TLS")))?;
    let verifier = verify::for_remote(trust, remote, provider())?;
    let build = |alpn: &[u8]| -> Result<Arc<ClientConfig>, Error> {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::clone(&verifier))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(cfg))
    };
    Ok(Dial {
        tunnel: build(ALPN_TUNNEL)?,
        health: build(ALPN_HEALTH)?,
        name,
    })
}

/// The host of `HOST:PORT` or `[V6]:PORT`, without brackets.
fn host_of(remote: &str) -> &str {
    let host = remote.rsplit_once(':').map_or(remote, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Whether the ClientHello at the start of `peeked` (bytes looked at, not taken, from a
/// connection) offers the ALPN protocol `proto`; `None` while too little has arrived to say.
/// Bytes that are no ClientHello offer nothing.
pub fn hello_offers(peeked: &[u8], proto: &[u8]) -> Option<bool> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = peeked;
    while !rest.is_empty() {
        if acceptor.read_tls(&mut rest).is_err() {
            return Some(false);
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Some(
            accepted
                .client_hello()
                .alpn()
                .is_some_and(|mut offered| offered.any(|p| p == proto)),
        ),
        Ok(None) => None,
        Err(_) => Some(false),
    }
}

/// The `Refused` inside a failed handshake's error, if our verifier refused the remote.
pub fn refusal(e: &rustls::Error) -> Option<&Refused> {
    match e {
        rustls::Error::Other(o) => o.0.downcast_ref::<Refused>(),
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
            o.0.downcast_ref::<Refused>()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_print_and_parse_back() {
        let fp = Fingerprint::of(b"certificate");
        let text = fp.to_string();
        assert!(text.starts_with("sha256:"));
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        // openssl's form: upper case with colons.
        let openssl: String =
            fp.0.iter()
                .map(|b| format!("{b:02X}"))
                .collect::<Vec<_>>()
                .join(":");
        assert_eq!(
            format!("sha256:{openssl}").parse::<Fingerprint>().unwrap(),
            fp
        );
        for bad in ["", "sha256:", "md5:00", "sha256:zz", &text[..70]] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_probe_is_told_from_a_tunnel_by_its_client_hello() {
        use rustls::pki_types::ServerName;
        let dial = dial(&Trust::Pins(vec![Fingerprint([0; 32])]), "127.0.0.1:1").unwrap();
        let hello = |cfg: &Arc<ClientConfig>| {
            let name = ServerName::try_from("127.0.0.1").unwrap();
            let mut c = rustls::ClientConnection::new(Arc::clone(cfg), name).unwrap();
            let mut out = Vec::new();
            c.write_tls(&mut out).unwrap();
            out
        };
        let probe = hello(&dial.health);
        let tunnel = hello(&dial.tunnel);
        assert_eq!(hello_offers(&probe, ALPN_HEALTH), Some(true));
        assert_eq!(hello_offers(&tunnel, ALPN_HEALTH), Some(false));
        assert_eq!(hello_offers(&probe[..probe.len() / 2], ALPN_HEALTH), None);
        assert_eq!(hello_offers(b"FG\x02\x03", ALPN_HEALTH), Some(false));
    }

    #[test]
    fn host_names_come_from_remote_addresses() {
        assert_eq!(host_of("proxy.example.com:7080"), "proxy.example.com");
        assert_eq!(host_of("127.0.0.1:7080"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7080"), "::1");
    }
}
