//! local-proxy: serve apps (SOCKS5 + HTTP on one port), or `signup` for a new account.

use flowgate::cli::{LocalCli, LocalCommand};
use flowgate::net::server::drain;
use flowgate::net::sys::ShutdownSignals;
use flowgate::proto::tunnel::Status;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli: LocalCli = flowgate::cli::parse_or_exit("local-proxy");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("local-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: LocalCli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Some(LocalCommand::Signup {
            remote,
            user,
            password_stdin,
        }) => {
            let remote = remote.0;
            flowgate::users::validate_name(&user)?;
            let creds = LocalCommand::signup_credentials(&user, password_stdin)?;
            let timeouts = flowgate::config::Timeouts::default();
            match flowgate::local::signup(&remote, &creds, &timeouts)? {
                Status::Ok => {
                    println!("signed up user {user} at {remote}");
                    Ok(())
                }
                Status::SignupDisabled => Err(format!(
                    "{remote} does not allow signup (remote-proxy needs --allow-signup)"
                )
                .into()),
                other => Err(format!("signup refused: {other}").into()),
            }
        }
        Some(LocalCommand::Check {
            remote,
            user,
            password_stdin,
        }) => {
            let creds = LocalCommand::signup_credentials(&user, password_stdin)?;
            let remotes: Vec<String> = remote.into_iter().map(|r| r.0).collect();
            if check(remotes, &creds) {
                Ok(())
            } else {
                Err("not every remote-proxy is usable with these credentials".into())
            }
        }
        None => {
            // A password prompt (into_config) must still answer Ctrl-C the usual way.
            let cfg = cli.run.into_config()?;
            // Before any thread exists, so every thread inherits the blocked signals.
            let signals = ShutdownSignals::block()?;
            flowgate::init_logging();
            let fd_limit = flowgate::net::sys::raise_fd_limit();
            let grace = cfg.timeouts.grace;
            let mut server = flowgate::local::start(cfg)?;
            // After the "listening on" line, which scripts read as the first line.
            if let Some(n) = fd_limit {
                log::debug!("open-file limit {n}");
            }
            let signals = signals.into_channel()?;
            let sig = signals.recv()?;
            let open = server.active();
            server.shutdown(); // no new app connections; open tunnels run on
            log::info!(
                "{sig}: {open} tunnels open, waiting up to {} (a second signal stops now)",
                flowgate::cli::HumanDuration(grace)
            );
            drain(&server, &signals, grace).log();
            Ok(())
        }
    }
}

/// `local-proxy check`: one line per remote; true when all are reachable and accept `creds`.
fn check(remotes: Vec<String>, creds: &flowgate::config::Credentials) -> bool {
    use flowgate::local::upstreams::connect::{self, CheckAnswer};
    let cfg = flowgate::config::Upstreams::new(remotes);
    let timeout = cfg.health_timeout.max(std::time::Duration::from_secs(2));
    let mut all_ok = true;
    for name in &cfg.remotes {
        let verdict = match connect::resolve(name) {
            Err(e) => Err(format!("cannot resolve: {e}")),
            Ok(addrs) => match connect::probe(&addrs, timeout) {
                Err(e) => Err(format!("unreachable: {e}")),
                Ok(Status::Draining) => Err("reachable, but draining (shutting down)".into()),
                Ok(Status::UnsupportedVersion) | Ok(Status::Malformed) => {
                    Err("reachable, but it speaks an older protocol (upgrade it)".into())
                }
                Ok(_) => match connect::check(&addrs, creds, timeout) {
                    Ok(CheckAnswer::Ok(bw)) => Ok(format!(
                        "reachable, protocol {}, user {} accepted, bandwidth {}",
                        flowgate::proto::tunnel::VERSION,
                        creds.user,
                        bw.map_or("unlimited".to_string(), |b| {
                            flowgate::limit::rate::Bandwidth::bytes_per_sec(b).to_string()
                        })
                    )),
                    Ok(CheckAnswer::Refused(status)) => Err(format!(
                        "reachable, but user {} refused: {status}",
                        creds.user
                    )),
                    Err(e) => Err(format!("reachable, but the check failed: {e}")),
                },
            },
        };
        match verdict {
            Ok(line) => println!("{name}: ok: {line}"),
            Err(line) => {
                all_ok = false;
                println!("{name}: FAILED: {line}");
            }
        }
    }
    all_ok
}
