//! Integration tests: real listeners on 127.0.0.1 ephemeral ports, an origin in the test,
//! nothing outside the machine.

mod admission;
mod cli;
mod curl;
mod errors;
mod health;
mod http;
mod rate;
mod resources;
mod shutdown;
mod socks5;
mod support;
mod upstreams;
