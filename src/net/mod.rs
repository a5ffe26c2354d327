//! The only code that owns sockets: listening and accepting (`server`), the worker threads
//! (`workers`), reading a handshake under a deadline (`handshake`), connecting out
//! (`connect`), moving bytes between two sockets (`relay`), idle connections waiting in an
//! epoll set (`parking`), and thin system-call wrappers (`sys`).
//!
//! What a connection says is parsed by proto/; what to do about it is decided by local/ and
//! remote/, which implement [`server::Service`].

pub mod connect;
pub mod handshake;
pub mod hop;
pub mod parking;
pub mod relay;
pub mod server;
pub mod sys;
pub mod workers;

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{TcpListener, TcpStream};

    /// A connected client socket and the server side of it, on loopback.
    pub fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }
}
