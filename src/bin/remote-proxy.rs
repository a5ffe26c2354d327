//! remote-proxy: `serve` tunnels, and `user add|set|del|list|show`, `usage` and
//! `invite create|list|revoke` on the same database.

use flowgate::cli::{
    human_bytes, utc_timestamp, InviteCommand, RemoteCli, RemoteCommand, UsageArgs, UsageBy,
    UsageCommand, UserCommand,
};
use flowgate::limit::calendar::{unix_now, Date};
use flowgate::limit::quota::{self, Period};
use flowgate::net::server::drain;
use flowgate::net::sys::ShutdownSignals;
use flowgate::users::usage;
use flowgate::users::{Changes, Db};
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
            let signals = ShutdownSignals::block_with_reload()?;
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
            let sig = loop {
                match signals.recv()? {
                    "SIGHUP" => reload(&remote),
                    sig => break sig,
                }
            };
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
        RemoteCommand::CheckConfig(args) => {
            let lines = flowgate::cli::file::effective::<RemoteCli>(
                std::env::args_os().collect(),
                "check-config",
            )?;
            args.into_config(cli.db, state_dir)?;
            println!("# remote-proxy serve: effective settings (the source after each)");
            for l in lines {
                println!("{l}");
            }
            eprintln!("settings ok");
            Ok(())
        }
        RemoteCommand::User(cmd) => user(cmd, &cli.db),
        RemoteCommand::Invite(cmd) => invite(cmd, &cli.db),
        RemoteCommand::Usage(args) => usage_report(args, &cli.db),
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

/// SIGHUP: reads the settings again (the --config file and the same flags) and applies
/// what can change without dropping tunnels; an invalid file changes nothing.
fn reload(remote: &flowgate::remote::Remote) {
    let parsed = flowgate::cli::file::parse::<RemoteCli>(std::env::args_os().collect());
    let cli = match parsed {
        Ok(cli) => cli,
        Err(Ok(line)) => {
            return log::error!("SIGHUP: {line}; keeping the current settings");
        }
        Err(Err(e)) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid settings");
            return log::error!("SIGHUP: {first}; keeping the current settings");
        }
    };
    let state_dir = cli.state_dir();
    let RemoteCommand::Serve(args) = cli.command else {
        return log::error!("SIGHUP: the settings no longer say serve; keeping the current ones");
    };
    match args.into_config(cli.db, state_dir) {
        Ok(cfg) => {
            let changes = remote.reload(cfg);
            if changes.is_empty() {
                log::info!("SIGHUP: settings read again; nothing changed");
            }
            for c in changes {
                log::info!("SIGHUP: {c}");
            }
        }
        Err(e) => log::error!("SIGHUP: {e}; keeping the current settings"),
    }
}

fn user(cmd: UserCommand, db: &Db) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        UserCommand::Add {
            name,
            bandwidth,
            password,
            limits,
        } => {
            flowgate::users::validate_name(&name)?;
            let pw = password.required()?;
            let store = db.open()?;
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
                    "nothing to change: give --bandwidth, --max-connections, --rate, --quota or a password"
                        .into(),
                );
            }
            db.open()?.set(&name, &changes)?;
            println!(
                "updated user {name}: {}",
                flowgate::cli::describe_changes(&changes)
            );
        }
        UserCommand::Del { name } => {
            db.open()?.delete(&name)?;
            println!("deleted user {name}");
        }
        UserCommand::List { bytes } => user_list(db, bytes)?,
        UserCommand::Show { name, bytes } => user_show(db, &name, bytes)?,
    }
    Ok(())
}

/// `user list`: one line per user with limits, quota, usage today and this month, last
/// seen and open tunnels (as of the running server's last flush).
fn user_list(db: &Db, exact: bool) -> Result<(), Box<dyn std::error::Error>> {
    let store = db.open()?;
    let now = unix_now();
    let (today, month) = (Period::Day.start(now), Period::Month.start(now));
    let rows = store.usage(None, month.min(today))?;
    let (by_day, by_month) = (
        usage::totals_since(&rows, today),
        usage::totals_since(&rows, month),
    );
    let activity: std::collections::HashMap<String, flowgate::users::Activity> = store
        .activity()?
        .into_iter()
        .map(|a| (a.user.clone(), a))
        .collect();
    let size = |v: Option<&(u64, u64)>| human_bytes(v.map_or(0, |(u, d)| u + d), exact);
    println!(
        "{:<20} {:>12} {:>8} {:>7} {:>14} {:>10} {:>10} {:>19} {:>4}",
        "NAME",
        "BANDWIDTH",
        "MAX-CONN",
        "RATE",
        "QUOTA",
        "TODAY",
        "MONTH",
        "LAST SEEN (UTC)",
        "OPEN"
    );
    let mut as_of = None;
    for u in store.list()? {
        let act = activity.get(&u.name);
        as_of = as_of.max(act.map(|a| a.as_of));
        println!(
            "{:<20} {:>12} {:>8} {:>7} {:>14} {:>10} {:>10} {:>19} {:>4}",
            u.name,
            u.bandwidth.to_string(),
            u.max_connections.map_or("-".into(), |c| c.to_string()),
            u.rate.map_or("-".into(), |r| r.to_string()),
            u.quota.map_or("-".into(), |q| q.to_string()),
            size(by_day.get(&u.name)),
            size(by_month.get(&u.name)),
            act.and_then(|a| a.last_seen)
                .map_or("never".into(), utc_timestamp),
            act.map_or(0, |a| a.open_tunnels),
        );
    }
    if let Some(at) = as_of {
        eprintln!("(usage and open tunnels as of {} UTC)", utc_timestamp(at));
    }
    Ok(())
}

/// `user show NAME`: one user in detail.
fn user_show(db: &Db, name: &str, exact: bool) -> Result<(), Box<dyn std::error::Error>> {
    let store = db.open()?;
    let u = store
        .get(name)?
        .ok_or_else(|| flowgate::users::Error::NotFound(name.to_string()))?;
    let now = unix_now();
    let act = store.activity()?.into_iter().find(|a| a.user == u.name);
    println!("name             {}", u.name);
    println!("created          {} UTC", utc_timestamp(u.created_at));
    println!("bandwidth        {}", u.bandwidth);
    println!(
        "max-connections  {}",
        u.max_connections.map_or("none".into(), |c| c.to_string())
    );
    println!(
        "rate             {}",
        u.rate.map_or("none".into(), |r| r.to_string())
    );
    match u.quota {
        Some(q) => {
            let start = q.period.start(now);
            let used = store.quota_used(&u.name, start)?;
            println!(
                "quota            {q}: {} used, {} left, resets {} UTC",
                human_bytes(used, exact),
                human_bytes(quota::left(q, used), exact),
                utc_timestamp(q.period.next(now))
            );
        }
        None => println!("quota            none"),
    }
    if let Some(a) = &act {
        println!(
            "last seen        {}",
            a.last_seen
                .map_or("never".into(), |t| format!("{} UTC", utc_timestamp(t)))
        );
        println!(
            "open tunnels     {} (as of {} UTC)",
            a.open_tunnels,
            utc_timestamp(a.as_of)
        );
    } else {
        println!("last seen        never");
    }
    let since = Period::Day.start(now) - 6 * 86_400;
    let rows = store.usage(Some(&u.name), since.min(Period::Month.start(now)))?;
    println!("usage (UTC)      up / down");
    let days: Vec<_> = rows.iter().filter(|r| r.hour >= since).cloned().collect();
    // This month (and the last one, early in a month), then the last seven days.
    let periods = usage::by_period(&rows, true)
        .into_iter()
        .chain(usage::by_period(&days, false));
    for p in periods {
        println!(
            "  {:<14} {} / {}",
            p.period,
            human_bytes(p.up, exact),
            human_bytes(p.down, exact)
        );
    }
    Ok(())
}

/// `usage [--user NAME] [--since DATE] [--by day|month] [--json]` and `usage reset NAME`.
fn usage_report(args: UsageArgs, db: &Db) -> Result<(), Box<dyn std::error::Error>> {
    let store = db.open()?;
    let now = unix_now();
    if let Some(UsageCommand::Reset { name }) = args.reset {
        let u = store
            .get(&name)?
            .ok_or_else(|| flowgate::users::Error::NotFound(name.clone()))?;
        // Without a quota there is nothing to reset against: say so rather than pretend.
        let q = u
            .quota
            .ok_or_else(|| format!("user {name} has no quota (set one with user set --quota)"))?;
        let start = q.period.start(now);
        let used = store.quota_used(&name, start)?;
        store.reset_quota(&name, start)?;
        println!(
            "reset the quota of {name}: {} forgiven, {} left until {} UTC",
            human_bytes(used, args.bytes),
            human_bytes(q.bytes, args.bytes),
            utc_timestamp(q.period.next(now))
        );
        return Ok(());
    }
    let since = args
        .since
        .map_or_else(|| Period::Month.start(now), Date::start);
    let rows = store.usage(args.user.as_deref(), since)?;
    let periods = usage::by_period(&rows, args.by == UsageBy::Month);
    if args.json {
        println!("{}", usage::to_json(&periods));
        return Ok(());
    }
    println!(
        "{:<12} {:<20} {:>14} {:>14} {:>14}",
        "PERIOD", "USER", "UP", "DOWN", "TOTAL"
    );
    for p in &periods {
        println!(
            "{:<12} {:<20} {:>14} {:>14} {:>14}",
            p.period,
            p.user,
            human_bytes(p.up, args.bytes),
            human_bytes(p.down, args.bytes),
            human_bytes(p.up + p.down, args.bytes)
        );
    }
    Ok(())
}

fn invite(cmd: InviteCommand, db: &Db) -> Result<(), Box<dyn std::error::Error>> {
    use flowgate::users::invites;
    let expiry = |at: Option<i64>| at.map_or("never".into(), utc_timestamp);
    match cmd {
        InviteCommand::Create { uses, expires } => {
            let token = invites::new_token();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let expires_at = expires.0.map(|d| now + d.as_secs() as i64);
            let made = db
                .open()?
                .add_invite(&invites::token_hash(&token), uses, expires_at)?;
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
            for i in db.open()?.invites()? {
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
            db.open()?.revoke_invite(&id)?;
            println!("revoked invite {id}");
        }
    }
    Ok(())
}
