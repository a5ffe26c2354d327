//! flowgate: a two-hop TCP proxy with per-user bandwidth control.
//!
//! A byte's path from app to target, by folder:
//!
//! 1. `net::server` (net/server.rs) accepts the app's connection on local-proxy's port;
//!    `limit::admission` gives it a slot or queues it unread; `net::workers` runs it.
//! 2. `local` (local/mod.rs) peeks the first byte and runs the app's handshake with
//!    `proto::socks5` or `proto::http`, read under one deadline by `net::handshake`;
//!    `local::logins` checks an app's RFC 1929 password with the remote before answering.
//! 3. `local::upstreams` picks a remote-proxy that is up (sticky per user by default),
//!    connects, runs the TLS 1.3 handshake (`net::hop`, checking the remote's identity as
//!    `tls` says: pin, CA or known-remotes file), and sends a `proto::tunnel` request
//!    (credentials and target, docs/protocol.md) inside it, failing over to the next remote
//!    if this one does not answer.
//! 4. On remote-proxy, `net::server` accepts again and admits, `net::hop` runs the server
//!    side of the TLS handshake with the identity from `tls::Identity`, `remote`
//!    (remote/mod.rs) reads the request, applies `limit::throttle`, checks the password
//!    with `users` (argon2id, cached), `limit::destinations` checks the resolved target against the destination policy, and
//!    `net::connect` opens the connection to the target.
//! 5. The tunnel reply travels back; `local::refusal` turns a refusal into the app's own
//!    protocol, or the app is told "connected".
//! 6. `net::relay` moves the bytes both ways on both hops: the TLS leg through rustls
//!    (relay/tls.rs), plain legs by splice through pipes from a shared pool; on remote-proxy every chunk is paid for from the user's
//!    `limit::bucket`, held in `remote::Registry` and shared by all of that user's tunnels.
//!
//! `proto` and `limit` never touch a socket: they are bytes and bookkeeping, tested without
//! the network. `config` holds validated settings and every default; `cli` turns flags into
//! them.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

// Doc comments in cli.rs are --help text; flattened and subcommand fields have none.
#[allow(missing_docs)]
pub mod cli;
pub mod config;
pub mod limit;
pub mod local;
pub mod metrics;
pub mod net;
pub mod proto;
pub mod remote;
pub mod tls;
pub mod users;

/// Starts env_logger with `info` as the default level (RUST_LOG overrides it).
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
}
