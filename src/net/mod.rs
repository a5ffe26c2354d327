//! The only code that owns sockets: listening and accepting (`server`), the worker threads
//! (`workers`), reading a handshake under a deadline (`handshake`), connecting out
//! (`connect`), moving bytes between two sockets (`relay`), and thin system-call wrappers
//! (`sys`).
//!
//! What a connection says is parsed by proto/; what to do about it is decided by local/ and
//! remote/, which implement [`server::Service`].

pub mod connect;
pub mod handshake;
pub mod relay;
pub mod server;
pub mod sys;
pub mod workers;
