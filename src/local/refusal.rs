//! Why local-proxy could not give an app its tunnel, and the one place that turns each reason
//! into the app's protocol: a SOCKS5 reply code or an HTTP status (with its `Retry-After`).
//!
//! The tables themselves live with each protocol (`socks5::Reply::for_status`,
//! `socks5::Reply::for_io_error`, `http::status_for`, `http::status_for_io_error`); this file
//! only picks which of them applies.

use super::upstreams::connect::TunnelError;
use crate::net::hop::HopError;
use crate::proto::tunnel::{self, Status};
use crate::proto::{http, is_out_of_descriptors, socks5};
use std::fmt;

/// Seconds an app is told to wait after local-proxy ran out of descriptors.
const DESCRIPTOR_RETRY_SECS: u16 = 1;

/// Why a tunnel was not opened.
#[derive(Debug)]
pub enum Refusal {
    /// remote-proxy answered with a status other than `ok`.
    Remote {
        /// What remote-proxy said.
        status: Status,
        /// Its retry hint, in seconds (0: none).
        retry_after: u16,
        /// With `QuotaExceeded`: when the quota resets, Unix seconds (0: unknown).
        resets_at: i64,
    },
    /// local-proxy could not ask, or got no usable answer.
    Local(TunnelError),
}

impl Refusal {
    /// The SOCKS5 reply code for this refusal.
    pub fn socks5_reply(&self) -> socks5::Reply {
        match self {
            Refusal::Remote { status, .. } => socks5::Reply::for_status(*status),
            Refusal::Local(TunnelError::Remote(e)) => socks5::Reply::for_io_error(e),
            Refusal::Local(TunnelError::Protocol(_)) => {
                socks5::Reply::for_status(Status::GeneralFailure)
            }
            Refusal::Local(TunnelError::Request(e)) => socks5::Reply::for_status(request_status(e)),
            Refusal::Local(TunnelError::Tls(HopError::Io(e))) => socks5::Reply::for_io_error(e),
            Refusal::Local(
                TunnelError::NoRemote | TunnelError::Tls(_) | TunnelError::TlsRequired,
            ) => socks5::Reply::for_status(Status::GeneralFailure),
        }
    }

    /// The HTTP status for this refusal.
    pub fn http_status(&self) -> u16 {
        match self {
            Refusal::Remote { status, .. } => http::status_for(*status),
            Refusal::Local(TunnelError::Remote(e)) => http::status_for_io_error(e),
            Refusal::Local(TunnelError::Protocol(_)) => http::status_for(Status::GeneralFailure),
            Refusal::Local(TunnelError::Request(e)) => http::status_for(request_status(e)),
            Refusal::Local(TunnelError::Tls(HopError::Io(e))) => http::status_for_io_error(e),
            Refusal::Local(
                TunnelError::NoRemote | TunnelError::Tls(_) | TunnelError::TlsRequired,
            ) => http::status_for(Status::GeneralFailure),
        }
    }

    /// Seconds the app should wait before retrying; 0 when a retry would not help.
    pub fn retry_after(&self) -> u16 {
        match self {
            Refusal::Remote { retry_after, .. } => *retry_after,
            Refusal::Local(TunnelError::Remote(e)) if is_out_of_descriptors(e) => {
                DESCRIPTOR_RETRY_SECS
            }
            Refusal::Local(_) => 0,
        }
    }
}

/// The status a request we could not even encode deserves: oversized credentials are bad
/// credentials (RFC 1929 failure / 407), anything else a general failure.
fn request_status(e: &tunnel::Error) -> Status {
    match e {
        tunnel::Error::CredentialTooLong => Status::BadCredentials,
        _ => Status::GeneralFailure,
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A tunnel is refused "not allowed" by the remote's destination policy.
            Refusal::Remote {
                status: Status::NotAllowed,
                ..
            } => write!(f, "destination not allowed by remote-proxy's policy"),
            Refusal::Remote {
                status: Status::TooManyFailedLogins,
                retry_after,
                ..
            } => write!(
                f,
                "too many failed logins for this user; retry in {retry_after}s"
            ),
            Refusal::Remote {
                status: Status::QuotaExceeded,
                resets_at,
                ..
            } if *resets_at > 0 => write!(
                f,
                "this user's volume quota is used up; it resets at {} UTC",
                crate::limit::calendar::timestamp(*resets_at)
            ),
            Refusal::Remote {
                status: Status::QuotaExceeded,
                ..
            } => write!(f, "this user's volume quota is used up"),
            Refusal::Remote { status, .. } => write!(f, "{status}"),
            Refusal::Local(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn local(e: io::Error) -> Refusal {
        Refusal::Local(TunnelError::Remote(e))
    }

    #[test]
    fn each_reason_gets_its_code_in_both_protocols() {
        let cases: Vec<(Refusal, u8, u16, u16)> = vec![
            (local(io::ErrorKind::TimedOut.into()), 0x06, 504, 0),
            (local(io::ErrorKind::ConnectionRefused.into()), 0x01, 502, 0),
            (
                local(io::Error::from_raw_os_error(nix::libc::EMFILE)),
                0x01,
                503,
                DESCRIPTOR_RETRY_SECS,
            ),
            (
                Refusal::Remote {
                    status: Status::RateLimited,
                    retry_after: 7,
                    resets_at: 0,
                },
                0x02,
                429,
                7,
            ),
            (
                Refusal::Remote {
                    status: Status::TargetRefused,
                    retry_after: 0,
                    resets_at: 0,
                },
                0x05,
                502,
                0,
            ),
            (
                Refusal::Remote {
                    status: Status::QuotaExceeded,
                    retry_after: 0,
                    resets_at: 1_798_761_600,
                },
                0x02,
                403,
                0,
            ),
            (
                Refusal::Local(TunnelError::Request(tunnel::Error::CredentialTooLong)),
                0x02,
                407,
                0,
            ),
            (Refusal::Local(TunnelError::NoRemote), 0x01, 502, 0),
            (
                Refusal::Local(TunnelError::Protocol(tunnel::Error::BadStatus(0x77))),
                0x01,
                502,
                0,
            ),
        ];
        for (r, socks, http, retry) in cases {
            if let Refusal::Remote {
                status: Status::QuotaExceeded,
                ..
            } = r
            {
                assert!(
                    r.to_string().contains("resets at 2027-01-01 00:00:00 UTC"),
                    "{r}"
                );
            }
            assert_eq!(r.socks5_reply() as u8, socks, "{r}");
            assert_eq!(r.http_status(), http, "{r}");
            assert_eq!(r.retry_after(), retry, "{r}");
        }
    }
}
