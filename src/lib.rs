//! flowgate: a two-hop TCP proxy with per-user bandwidth control.
//!
//! A connection's path through the modules, app to target:
//!
//! 1. `server` accepts it on local-proxy's port and hands it to a worker.
//! 2. `local` peeks the first byte: `socks5` (RFC 1928/1929) or `http_connect` (CONNECT and
//!    absolute-form requests) reads the app's handshake into an `addr::TargetAddr`.
//! 3. `local` opens a connection to remote-proxy and sends a `tunnel` request (credentials +
//!    target, docs/protocol.md).
//! 4. On remote-proxy, `server` accepts, `remote` reads the request, `users` checks the
//!    password (argon2id, cached), and `remote` connects to the target.
//! 5. The `tunnel` reply travels back; `local` answers the app in its own protocol.
//! 6. `relay` pumps bytes both ways on both hops; on remote-proxy each chunk is paid for
//!    from the user's `bucket`, shared by all of that user's connections.
//!
//! Around that: `admission` (slots, the paused FIFO queue, per-user caps) and `throttle`
//! (request rates) decide who is served; `rate` (bandwidth and request-rate values), `clock`
//! (injectable time), `config` and `cli` (settings and flags), `origin` (a test and demo HTTP
//! origin).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

// Doc comments in cli.rs are --help text; flattened and subcommand fields have none.
#[allow(missing_docs)]
pub mod cli;
pub mod config;
pub mod limit;
pub mod local;
pub mod net;
pub mod proto;
pub mod remote;
pub mod users;

/// Starts env_logger with `info` as the default level (RUST_LOG overrides it).
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
}
