//! flowgate-origin: the demo/test/benchmark origin (tests/it/support/origin.rs) as a process,
//! so scripts/demo.sh and scripts/loadtest.sh need nothing but this repository and curl. The
//! origin is compiled into this binary, the tests and the benchmark, not into the library.

#[path = "../../tests/it/support/origin.rs"]
#[allow(dead_code)]
mod origin;

use clap::Parser;
use std::net::SocketAddr;
use std::process::ExitCode;

/// Serves GET /bytes/N (N deterministic bytes) and POST /sink (checks an upload).
#[derive(Debug, Parser)]
#[command(name = "flowgate-origin", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    flowgate::init_logging();
    match origin::Origin::start(cli.listen) {
        Ok(o) => {
            log::info!("origin listening on {}", o.local_addr());
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            eprintln!("flowgate-origin: cannot listen on {}: {e}", cli.listen);
            ExitCode::FAILURE
        }
    }
}
