//! Integration tests: real listeners on 127.0.0.1 ephemeral ports, an origin in the test,
//! nothing outside the machine.

/// Runs the test body `$body(hop: HopMode)` twice: over TLS (`$name::tls`) and over
/// `--plaintext` (`$name::plaintext`), where the splice path carries both legs.
macro_rules! over_both_hops {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn tls() {
                super::$body(crate::support::tls)
            }
            #[test]
            fn plaintext() {
                super::$body(crate::support::plaintext)
            }
        }
    };
}

mod accounting;
mod admission;
mod cli;
mod config;
mod curl;
mod destinations;
mod errors;
mod fleet;
mod hardening;
mod health;
mod http;
mod metrics;
mod rate;
mod resources;
mod shutdown;
mod signup;
mod socks5;
mod store;
mod support;
mod tls;
mod upstreams;
mod warm;
