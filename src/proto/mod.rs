//! Wire formats as bytes: what apps send local-proxy (SOCKS5, HTTP) and what local-proxy and
//! remote-proxy say to each other (the tunnel protocol, docs/protocol.md).
//!
//! Every parser here reads from `impl Read` and every encoder writes to `impl Write` or a
//! buffer, so all of it is tested without sockets. Opening, timing out and closing
//! connections is net/'s job; deciding what to do with a request is local/'s and remote/'s.

pub mod addr;
pub mod http;
pub mod socks5;
pub mod tunnel;

#[cfg(test)]
mod fuzz;

use std::io;

/// True for the errors a socket timeout produces (`SO_RCVTIMEO` gives `WouldBlock` on Linux,
/// a connect timeout `TimedOut`): every protocol answers these as "timed out".
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// True when the process or the system ran out of file descriptors (`EMFILE`, `ENFILE`):
/// a passing shortage, answered as "server busy, retry" rather than as a failure.
pub fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE)
    )
}

/// Text a client sent (a user name, say), shown in a log line with control characters,
/// line breaks, bidi controls and other unprintable characters escaped, so it cannot forge
/// a line, hide itself or drive a terminal. Valid names print unchanged.
pub struct Shown<'a>(pub &'a str);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            if c == ' ' || c == '"' || c == '\'' || (c.is_ascii_graphic() && c != '\\') {
                std::fmt::Write::write_char(f, c)?;
            } else {
                write!(f, "{}", c.escape_debug())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_in_logs_cannot_break_lines_or_hide() {
        assert_eq!(Shown("alice@example.com").to_string(), "alice@example.com");
        assert_eq!(
            Shown("bob\n[INFO] forged line").to_string(),
            "bob\\n[INFO] forged line"
        );
        assert_eq!(Shown("a\rb\x1b[31mred").to_string(), "a\\rb\\u{1b}[31mred");
        assert_eq!(Shown("evil\u{202e}txt").to_string(), "evil\\u{202e}txt");
        assert_eq!(Shown("back\\slash").to_string(), "back\\\\slash");
        assert!(!Shown("x\u{7f}\u{0}").to_string().contains(['\u{7f}', '\0']));
    }

    #[test]
    fn io_errors_are_classified_by_kind_and_errno() {
        assert!(is_timeout(&io::ErrorKind::WouldBlock.into()));
        assert!(is_timeout(&io::ErrorKind::TimedOut.into()));
        assert!(!is_timeout(&io::ErrorKind::ConnectionRefused.into()));
        assert!(is_out_of_descriptors(&io::Error::from_raw_os_error(
            nix::libc::EMFILE
        )));
        assert!(is_out_of_descriptors(&io::Error::from_raw_os_error(
            nix::libc::ENFILE
        )));
        assert!(!is_out_of_descriptors(&io::ErrorKind::TimedOut.into()));
    }
}
