//! remote-proxy: `serve` tunnels, and `user add|set|del|list` on the same database.

use flowgate::cli::{RemoteCli, RemoteCommand, UserCommand};
use flowgate::users::Store;
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
    match cli.command {
        RemoteCommand::Serve(args) => {
            flowgate::init_logging();
            let server = flowgate::remote::start(args.into_config(cli.db))?;
            server.wait();
            Ok(())
        }
        RemoteCommand::User(cmd) => user(cmd, &cli.db),
    }
}

fn user(cmd: UserCommand, db: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        UserCommand::Add {
            name,
            bandwidth,
            password,
        } => {
            flowgate::users::validate_name(&name)?;
            let pw = password.required()?;
            Store::open(db)?.add(&name, &pw, bandwidth)?;
            println!("added user {name} with bandwidth {bandwidth}");
        }
        UserCommand::Set {
            name,
            bandwidth,
            password,
        } => {
            let pw = password.given()?;
            if bandwidth.is_none() && pw.is_none() {
                return Err("nothing to change: give --bandwidth and/or a password flag".into());
            }
            Store::open(db)?.set(&name, bandwidth, pw.as_deref())?;
            match bandwidth {
                Some(bw) => println!("updated user {name}: bandwidth {bw}"),
                None => println!("updated user {name}: password changed"),
            }
        }
        UserCommand::Del { name } => {
            Store::open(db)?.delete(&name)?;
            println!("deleted user {name}");
        }
        UserCommand::List => {
            let users = Store::open(db)?.list()?;
            println!("{:<24} {:>14}  created", "NAME", "BANDWIDTH");
            for u in users {
                println!(
                    "{:<24} {:>14}  {}",
                    u.name,
                    u.bandwidth.to_string(),
                    u.created_at
                );
            }
        }
    }
    Ok(())
}
