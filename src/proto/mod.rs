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
