//! local-proxy: serve apps (SOCKS5 + HTTP on one port), or `signup` for a new account.

use flowgate::cli::{LocalCli, LocalCommand};
use flowgate::local::upstreams::connect::Link;
use flowgate::net::server::drain;
use flowgate::net::sys::ShutdownSignals;
use flowgate::proto::tunnel::Status;
use std::process::ExitCode;

fn main() -> ExitCode {
    flowgate::cli::hide_password_from_environ();
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
        Some(LocalCommand::CheckConfig(args)) => {
            let lines = flowgate::cli::file::effective::<LocalCli>(
                std::env::args_os().collect(),
                "check-config",
            )?;
            args.check()?;
            println!("# local-proxy: effective settings (the source after each)");
            for l in lines {
                println!("{l}");
            }
            eprintln!("settings ok");
            Ok(())
        }
        Some(LocalCommand::Signup {
            remote,
            user,
            password_stdin,
            invite,
            hop,
        }) => {
            let remote = remote.0;
            flowgate::users::validate_name(&user)?;
            let link = link_to(&remote, &hop)?;
            let creds = LocalCommand::signup_credentials(&user, password_stdin)?;
            let timeouts = flowgate::config::Timeouts::default();
            match flowgate::local::signup(&remote, &link, &creds, invite.as_deref(), &timeouts)? {
                Status::Ok => {
                    println!("signed up user {user} at {remote}");
                    Ok(())
                }
                Status::SignupDisabled => Err(format!(
                    "{remote} does not allow signup (remote-proxy needs --allow-signup)"
                )
                .into()),
                Status::InviteRequired if invite.is_none() => Err(format!(
                    "{remote} takes signups only with an invite: ask its operator for one \
                     (`remote-proxy invite create`) and give it with --invite TOKEN"
                )
                .into()),
                Status::InviteRequired => Err(format!(
                    "signup refused: {remote} does not accept that invite (unknown, used up \
                     or expired); ask its operator for a new one"
                )
                .into()),
                Status::NotAllowed => Err(format!(
                    "signup refused by {remote}: the name or password is not allowed there, \
                     or it has reached its user limit"
                )
                .into()),
                other => Err(format!("signup refused: {other}").into()),
            }
        }
        Some(LocalCommand::Check {
            remote,
            user,
            password_stdin,
            hop,
        }) => {
            let remotes: Vec<String> = remote.into_iter().map(|r| r.0).collect();
            let links = remotes
                .iter()
                .map(|r| link_to(r, &hop))
                .collect::<Result<Vec<_>, _>>()?;
            let creds = LocalCommand::signup_credentials(&user, password_stdin)?;
            if check(remotes, &links, &creds) {
                Ok(())
            } else {
                Err("not every remote-proxy is usable with these credentials".into())
            }
        }
        Some(LocalCommand::Trust { remote, yes, known }) => {
            trust(&remote.0, yes, &known.known_remotes)
        }
        None => {
            // A password prompt (into_config) must still answer Ctrl-C the usual way.
            let cfg = cli.run.into_config()?;
            flowgate::cli::forget_handed_password();
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

/// How the subcommands reach `remote`: TLS verified as `hop` says, or plaintext.
fn link_to(remote: &str, hop: &flowgate::cli::HopArgs) -> Result<Link, Box<dyn std::error::Error>> {
    let trust = hop.tls().trust()?;
    Ok(Link::to(remote, trust.as_ref())?)
}

/// `local-proxy trust`: show the remote's identity, and record it once the user agrees.
fn trust(
    remote: &str,
    yes: bool,
    file: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    use flowgate::local::upstreams::connect;
    let known = flowgate::tls::KnownRemotes::open(file)?;
    let seen = connect::identity_of(remote, std::time::Duration::from_secs(10))?;
    let before = known.lookup(remote);
    if before.contains(&seen) {
        println!(
            "{remote} is already trusted with identity {seen} ({})",
            file.display()
        );
        return Ok(());
    }
    if before.is_empty() {
        println!("{remote} presents TLS identity {seen}");
    } else {
        let old: Vec<String> = before.iter().map(|f| f.to_string()).collect();
        println!(
            "WARNING: {remote} now presents TLS identity {seen}, but {} records {}.\n\
             Someone may be intercepting the connection, or the remote's key was replaced.\n\
             Only go on if the remote's operator confirms the new identity.",
            file.display(),
            old.join(", ")
        );
    }
    if !yes {
        print!(
            "Compare it with the identity the remote's operator gave you (remote-proxy \
             identity). Trust {remote}? [y/N] "
        );
        std::io::Write::flush(&mut std::io::stdout())?;
        let mut answer = String::new();
        std::io::BufRead::read_line(&mut std::io::stdin().lock(), &mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            return Err("not trusted: nothing recorded".into());
        }
    }
    known.record(remote, seen)?;
    println!("trusted {remote} ({seen}), recorded in {}", file.display());
    Ok(())
}

/// `local-proxy check`: one line per remote; true when all are reachable and accept `creds`.
fn check(remotes: Vec<String>, links: &[Link], creds: &flowgate::config::Credentials) -> bool {
    use flowgate::local::upstreams::connect::{self, CheckAnswer};
    let cfg = flowgate::config::Upstreams::new(remotes);
    let timeout = cfg.health_timeout.max(std::time::Duration::from_secs(2));
    let mut all_ok = true;
    for (name, link) in cfg.remotes.iter().zip(links) {
        let verdict = match connect::resolve(name) {
            Err(e) => Err(format!("cannot resolve: {e}")),
            Ok(addrs) => match connect::probe(&addrs, link, timeout) {
                Err(e @ connect::TunnelError::Remote(_)) => Err(format!("unreachable: {e}")),
                Err(e) => Err(format!("{e}")),
                Ok(Status::Draining) => Err("reachable, but draining (shutting down)".into()),
                Ok(Status::UnsupportedVersion) | Ok(Status::Malformed) => {
                    Err("reachable, but it speaks an older protocol (upgrade it)".into())
                }
                Ok(_) => match connect::check(&addrs, link, creds, timeout) {
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
