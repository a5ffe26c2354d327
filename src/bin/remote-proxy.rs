//! remote-proxy: `serve` tunnels, and `user add|set|del|list` and `invite create|list|revoke`
//! on the same database.

use flowgate::cli::{InviteCommand, RemoteCli, RemoteCommand, UserCommand};
use flowgate::net::server::drain;
use flowgate::net::sys::ShutdownSignals;
use flowgate::users::{Changes, Store, UserStore};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli: RemoteCli = flowgate::cli::parse_or_exit("remote-proxy");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remote-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: RemoteCli) -> Result<(), Box<dyn std::error::Error>> {
    let state_dir = cli.state_dir();
    match cli.command {
        RemoteCommand::Serve(args) => {
            // Before any thread exists, so every thread inherits the blocked signals.
            let signals = ShutdownSignals::block()?;
            flowgate::init_logging();
            let fd_limit = flowgate::net::sys::raise_fd_limit();
            let cfg = args.into_config(cli.db, state_dir)?;
            let grace = cfg.timeouts.grace;
            let (server, remote) = flowgate::remote::start_with_state(cfg)?;
            // After the "listening on" line, which scripts read as the first line.
            if let Some(n) = fd_limit {
                log::debug!("open-file limit {n}");
            }
            let signals = signals.into_channel()?;
            let sig = signals.recv()?;
            // Keep listening: probes must hear "draining", and tunnel requests get it as
            // their answer, so local-proxies move new tunnels elsewhere at once.
            remote.start_draining();
            log::info!(
                "{sig}: draining; {} tunnels open, waiting up to {} (a second signal stops now)",
                remote.open_tunnels(),
                flowgate::cli::HumanDuration(grace)
            );
            drain(&server, &signals, grace).log();
            Ok(())
        }
        RemoteCommand::User(cmd) => user(cmd, &cli.db),
        RemoteCommand::Invite(cmd) => invite(cmd, &cli.db),
        RemoteCommand::Identity { tls_cert } => {
            let fingerprint = match tls_cert {
                Some(cert) => {
                    use flowgate::tls::Fingerprint;
                    use rustls::pki_types::{pem::PemObject, CertificateDer};
                    let der = CertificateDer::from_pem_file(&cert)
                        .map_err(|e| format!("{}: {e}", cert.display()))?;
                    Fingerprint::of(&der)
                }
                None => {
                    let (id, made) = flowgate::tls::Identity::load_or_create(&state_dir)?;
                    if made {
                        eprintln!(
                            "made a new TLS identity in {} (owner-only files)",
                            state_dir.display()
                        );
                    }
                    id.fingerprint
                }
            };
            println!("{fingerprint}");
            Ok(())
        }
    }
}

fn user(cmd: UserCommand, db: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        UserCommand::Add {
            name,
            bandwidth,
            password,
            limits,
        } => {
            flowgate::users::validate_name(&name)?;
            let pw = password.required()?;
            let store = Store::open(db)?;
            let changes = limits.changes();
            if changes.is_empty() {
                store.add(&name, &pw, bandwidth)?;
            } else {
                // One transaction, so a failure leaves no half-made user behind.
                store.add_with(&name, &pw, bandwidth, &changes)?;
            }
            println!("added user {name} with bandwidth {bandwidth}");
        }
        UserCommand::Set {
            name,
            bandwidth,
            password,
            limits,
        } => {
            let changes = Changes {
                bandwidth,
                password: password.given()?,
                ..limits.changes()
            };
            if changes.is_empty() {
                return Err(
                    "nothing to change: give --bandwidth, --max-connections, --rate or a password"
                        .into(),
                );
            }
            Store::open(db)?.set(&name, &changes)?;
            println!(
                "updated user {name}: {}",
                flowgate::cli::describe_changes(&changes)
            );
        }
        UserCommand::Del { name } => {
            Store::open(db)?.delete(&name)?;
            println!("deleted user {name}");
        }
        UserCommand::List => {
            let users = Store::open(db)?.list()?;
            println!(
                "{:<24} {:>14} {:>9} {:>9}  CREATED (UTC)",
                "NAME", "BANDWIDTH", "MAX-CONN", "RATE"
            );
            for u in users {
                println!(
                    "{:<24} {:>14} {:>9} {:>9}  {}",
                    u.name,
                    u.bandwidth.to_string(),
                    u.max_connections.map_or("-".into(), |c| c.to_string()),
                    u.rate.map_or("-".into(), |r| r.to_string()),
                    flowgate::cli::utc_timestamp(u.created_at)
                );
            }
        }
    }
    Ok(())
}

fn invite(cmd: InviteCommand, db: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    use flowgate::cli::utc_timestamp;
    use flowgate::users::invites;
    let expiry = |at: Option<i64>| at.map_or("never".into(), utc_timestamp);
    match cmd {
        InviteCommand::Create { uses, expires } => {
            let token = invites::new_token();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let expires_at = expires.0.map(|d| now + d.as_secs() as i64);
            let made =
                Store::open(db)?.add_invite(&invites::token_hash(&token), uses, expires_at)?;
            // The token on stdout alone, for scripts; what it allows on stderr.
            println!("{token}");
            eprintln!(
                "invite {} allows {uses} signup{}, expires {} (UTC); the token is shown only now",
                made.id,
                if uses == 1 { "" } else { "s" },
                expiry(expires_at)
            );
        }
        InviteCommand::List => {
            println!(
                "{:<14} {:>9}  {:<19}  CREATED (UTC)",
                "ID", "USES-LEFT", "EXPIRES (UTC)"
            );
            for i in Store::open(db)?.invites()? {
                println!(
                    "{:<14} {:>9}  {:<19}  {}",
                    i.id,
                    i.uses_left,
                    expiry(i.expires_at),
                    utc_timestamp(i.created_at)
                );
            }
        }
        InviteCommand::Revoke { id } => {
            Store::open(db)?.revoke_invite(&id)?;
            println!("revoked invite {id}");
        }
    }
    Ok(())
}
