//! `--config FILE`: a TOML file whose keys are the flags' long names (`listen`,
//! `max-connections`, `allow-dest = ["10.0.0.0/8"]`, `plaintext = true`), read before clap
//! parses the command line and turned into the same flags, so a file and a command line
//! mean exactly the same thing and are checked by the same code. A flag given on the
//! command line wins over the file's key (for a list, the command line's values replace the
//! file's). An unknown key or a bad value is one line naming the file, the line and the key.
//!
//! Out of scope: what the flags mean (cli/mod.rs, config.rs).

use clap::ArgAction;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The `--config FILE` of a command line, else `FLOWGATE_CONFIG`, if either is given.
pub fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("FLOWGATE_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The long names of the flags given on a command line (`--listen`, `--listen=...`).
fn given(argv: &[OsString]) -> Vec<String> {
    argv.iter()
        .skip(1)
        .filter_map(|a| {
            let a = a.to_str()?.strip_prefix("--")?;
            Some(a.split('=').next().unwrap_or(a).to_string())
        })
        .collect()
}

/// The 1-based line where `key` is set in `text`, for error messages.
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let rest = l
                .strip_prefix(key)
                .or_else(|| l.strip_prefix(&format!("\"{key}\"")));
            rest.is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map_or(0, |i| i + 1)
}

/// A TOML scalar as the text a flag would take.
fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

/// Turns the file's keys into flags of `cmd`. `Ok(None)` for a key `cmd` does not have.
fn flags_for(
    cmd: &clap::Command,
    key: &str,
    value: &toml::Value,
) -> Result<Option<Vec<String>>, String> {
    let Some(arg) = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(key) && key != "config")
    else {
        return Ok(None);
    };
    let flag = format!("--{key}");
    let flags = match (arg.get_action(), value) {
        (ArgAction::SetTrue, toml::Value::Boolean(true)) => vec![flag],
        (ArgAction::SetTrue, toml::Value::Boolean(false)) => vec![],
        (ArgAction::SetTrue, _) => return Err("takes true or false".into()),
        (ArgAction::Append, toml::Value::Array(items)) => {
            let mut out = Vec::new();
            for item in items {
                let s = scalar(item).ok_or("takes a list of strings or numbers")?;
                out.push(format!("{flag}={s}"));
            }
            out
        }
        (_, v) => {
            let s = scalar(v).ok_or("takes a string or a number")?;
            vec![format!("{flag}={s}")]
        }
    };
    Ok(Some(flags))
}

/// Where the subcommand named on the command line is (its index in `argv`), skipping the
/// values of `root`'s own options.
fn subcommand_at(argv: &[OsString], root: &clap::Command) -> Option<usize> {
    let mut i = 1;
    while i < argv.len() {
        let a = argv[i].to_string_lossy();
        if a == "--" {
            return None;
        }
        if let Some(long) = a.strip_prefix("--") {
            let takes_value = !long.contains('=')
                && root.get_arguments().any(|x| {
                    x.get_long() == Some(long)
                        && !matches!(x.get_action(), ArgAction::SetTrue | ArgAction::Help)
                });
            i += if takes_value { 2 } else { 1 };
            continue;
        }
        if root.find_subcommand(a.as_ref()).is_some() {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Where the settings taken from a file came from, to name the line of a value clap
/// refuses.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    path: PathBuf,
    // (key, line) of each key added to the command line.
    keys: Vec<(String, usize)>,
}

impl Origin {
    /// Rewrites clap's complaint about a value that came from the file as
    /// `FILE:LINE: KEY: ...`; `None` when the value was not the file's.
    pub fn explain(&self, e: &clap::Error) -> Option<String> {
        use clap::error::{ContextKind, ContextValue};
        let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
            return None;
        };
        let long = arg.strip_prefix("--")?.split([' ', '=']).next()?;
        let (key, line) = self.keys.iter().find(|(k, _)| k == long)?;
        let text = e.to_string();
        let first = text.lines().next().unwrap_or("invalid value");
        let first = first.strip_prefix("error: ").unwrap_or(first);
        Some(format!("{}:{line}: {key}: {first}", self.path.display()))
    }
}

/// The command line with the file's settings added where clap expects them (unchanged when
/// it has no `--config`), and where they came from.
///
/// # Errors
/// One line: the file cannot be read or parsed, or a key is unknown or has a value of the
/// wrong kind (clap checks the values themselves; [`Origin::explain`] names their line).
pub fn with_config(
    argv: Vec<OsString>,
    root: &clap::Command,
) -> Result<(Vec<OsString>, Origin), String> {
    let on_command_line = given(&argv);
    let argv = switches_spelled_out(argv, root);
    let Some(path) = config_path(&argv) else {
        return Ok((argv, Origin::default()));
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let settings = read(&path, &text)?;
    let sub_at = subcommand_at(&argv, root);
    let sub = sub_at.and_then(|i| root.find_subcommand(argv[i].to_string_lossy().as_ref()));
    let (mut top, mut under) = (Vec::new(), Vec::new());
    let mut origin = Origin {
        path: path.clone(),
        keys: Vec::new(),
    };
    for (key, value) in &settings {
        origin.keys.push((key.clone(), line_of(&text, key)));
        if on_command_line.contains(key) {
            continue; // the command line wins
        }
        let at = |why: String| format!("{}:{}: {key}: {why}", path.display(), line_of(&text, key));
        // The subcommand's own flag first; then the top level's, unless the top level's
        // flags cannot go with a subcommand (local-proxy's run flags).
        if let Some(flags) = sub
            .map(|s| flags_for(s, key, value))
            .transpose()
            .map_err(at)?
            .flatten()
        {
            under.extend(flags);
            continue;
        }
        let top_allowed = sub.is_none() || !root.is_args_conflicts_with_subcommands_set();
        match flags_for(root, key, value).map_err(at)? {
            Some(flags) if top_allowed => {
                top.extend(flags);
                continue;
            }
            Some(_) => continue,
            None => {}
        }
        // A key of another subcommand (`serve`'s, while running `user list`) is not for
        // this command; one nobody has is a mistake.
        let known = root.get_subcommands().any(|s| {
            s.get_arguments()
                .any(|a| a.get_long() == Some(key.as_str()))
        });
        if !known {
            return Err(at(
                "unknown key (keys are the flags' long names, as in --help)".into(),
            ));
        }
    }
    let mut out = Vec::with_capacity(argv.len() + top.len() + under.len());
    out.push(argv[0].clone());
    out.extend(top.into_iter().map(OsString::from));
    for (i, a) in argv.into_iter().enumerate().skip(1) {
        out.push(a);
        if Some(i) == sub_at {
            out.extend(under.drain(..).map(OsString::from));
        }
    }
    Ok((out, origin))
}

/// `--SWITCH=true` as `--SWITCH`, and `--SWITCH=false` dropped, for every on/off flag of
/// `root` and its subcommands: so a switch a config file turns on can be turned off on the
/// command line (the flag is given, so the file's key is skipped), as every other key can
/// be overridden. Other values are left for clap to refuse.
fn switches_spelled_out(argv: Vec<OsString>, root: &clap::Command) -> Vec<OsString> {
    let is_switch = |long: &str| {
        std::iter::once(root)
            .chain(root.get_subcommands())
            .flat_map(|c| c.get_arguments())
            .any(|a| a.get_long() == Some(long) && matches!(a.get_action(), ArgAction::SetTrue))
    };
    let mut out = Vec::with_capacity(argv.len());
    let mut rest = false;
    for a in argv {
        let spelled = a.to_str().filter(|_| !rest).and_then(|t| {
            let (long, value) = t.strip_prefix("--")?.split_once('=')?;
            if !is_switch(long) {
                return None;
            }
            match value {
                "true" => Some(Some(OsString::from(format!("--{long}")))),
                "false" => Some(None),
                _ => None,
            }
        });
        rest |= a == "--";
        match spelled {
            Some(Some(flag)) => out.push(flag),
            Some(None) => {}
            None => out.push(a),
        }
    }
    out
}

/// Parses a command line with its `--config` file.
///
/// # Errors
/// `Err(Ok(line))`: one line to print (a mistake in the file, with its line); `Err(Err(e))`:
/// clap's own error (a bad flag, or `--help`, which clap prints itself).
pub fn parse<T: clap::Parser>(argv: Vec<OsString>) -> Result<T, Result<String, clap::Error>> {
    let (argv, origin) = with_config(argv, &T::command()).map_err(Ok)?;
    T::try_parse_from(argv).map_err(|e| origin.explain(&e).ok_or(e))
}

/// The effective settings of subcommand `sub` (or of the top level), one `key = value  #
/// source` line each, where source is `flag`, `file`, `env` or `default`; secrets (password,
/// invite) show as `<redacted>`.
///
/// # Errors
/// As [`parse`], as one line.
pub fn effective<T: clap::Parser>(argv: Vec<OsString>, sub: &str) -> Result<Vec<String>, String> {
    use clap::parser::ValueSource;
    let on_command_line = given(&argv);
    let root = T::command();
    let (argv, origin) = with_config(argv, &root)?;
    let matches = root
        .clone()
        .try_get_matches_from(argv)
        .map_err(|e| origin.explain(&e).unwrap_or_else(|| e.to_string()))?;
    let (cmd, m) = match (root.find_subcommand(sub), matches.subcommand_matches(sub)) {
        (Some(c), Some(m)) => (c.clone(), m.clone()),
        _ => (root.clone(), matches.clone()),
    };
    let mut lines = Vec::new();
    let globals = root.get_arguments().filter(|a| a.is_global_set());
    for arg in cmd.get_arguments().chain(globals) {
        let (id, Some(long)) = (arg.get_id().as_str(), arg.get_long()) else {
            continue;
        };
        if matches!(long, "help" | "version") {
            continue;
        }
        let m = if m.try_get_raw(id).is_ok() {
            &m
        } else {
            &matches
        };
        let Ok(Some(raw)) = m.try_get_raw(id) else {
            continue;
        };
        let values: Vec<String> = raw.map(|v| v.to_string_lossy().into_owned()).collect();
        let secret = matches!(long, "password" | "invite");
        let shown = match (secret, values.as_slice()) {
            (true, _) => "\"<redacted>\"".to_string(),
            (false, [one]) if !matches!(arg.get_action(), ArgAction::Append) => toml_text(one),
            (false, many) => format!(
                "[{}]",
                many.iter()
                    .map(|v| toml_text(v))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let source = if on_command_line.iter().any(|k| k == long) {
            "flag"
        } else if origin.keys.iter().any(|(k, _)| k == long) {
            "file"
        } else {
            match m.value_source(id) {
                Some(ValueSource::EnvVariable) => "env",
                Some(ValueSource::DefaultValue) => "default",
                _ => "flag",
            }
        };
        if lines
            .iter()
            .any(|l: &String| l.starts_with(&format!("{long} = ")))
        {
            continue;
        }
        lines.push(format!("{long} = {shown}  # {source}"));
    }
    Ok(lines)
}

/// A value as TOML: `true`, a number, or a quoted string.
fn toml_text(v: &str) -> String {
    if v == "true" || v == "false" || v.parse::<i64>().is_ok() {
        v.to_string()
    } else {
        toml::Value::String(v.to_string()).to_string()
    }
}

/// The file's top-level keys and values, in file order.
fn read(path: &Path, text: &str) -> Result<Vec<(String, toml::Value)>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e.span().map_or(0, |s| {
            text[..s.start.min(text.len())].lines().count().max(1)
        });
        let msg = e.message().replace('\n', " ");
        format!("{}:{line}: {msg}", path.display())
    })?;
    let mut keys: BTreeMap<usize, (String, toml::Value)> = BTreeMap::new();
    for (k, v) in table {
        if let toml::Value::Table(_) = v {
            return Err(format!(
                "{}:{}: {k}: sections are not used; write the flags' names at the top level",
                path.display(),
                line_of(text, &format!("[{k}]")).max(line_of(text, &k))
            ));
        }
        keys.insert(line_of(text, &k) * 1000 + keys.len(), (k, v));
    }
    Ok(keys.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn write(text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("flowgate-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = dir.join(format!("{}.toml", N.fetch_add(1, Ordering::SeqCst)));
        std::fs::write(&p, text).unwrap();
        p
    }

    fn argv(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn keys_become_the_same_flags_and_the_command_line_wins() {
        let f = write(
            "db = \"/tmp/x.db\"\nlisten = \"127.0.0.1:9\"\nmax-connections = 10\n\
             allow-dest = [\"10.0.0.0/8\", \"::1/128\"]\nplaintext = true\nallow-signup = false\n",
        );
        let cmd = crate::cli::RemoteCli::command();
        let out = with_config(
            argv(&[
                "remote-proxy",
                "--config",
                f.to_str().unwrap(),
                "serve",
                "--listen",
                "127.0.0.1:8",
            ]),
            &cmd,
        )
        .unwrap()
        .0;
        assert_eq!(
            strings(out),
            [
                "remote-proxy",
                "--db=/tmp/x.db",
                "--config",
                f.to_str().unwrap(),
                "serve",
                "--max-connections=10",
                "--allow-dest=10.0.0.0/8",
                "--allow-dest=::1/128",
                "--plaintext",
                "--listen",
                "127.0.0.1:8",
            ]
        );
        // `user list` takes the file's database and leaves serve's keys alone.
        let out = with_config(
            argv(&[
                "remote-proxy",
                "--config",
                f.to_str().unwrap(),
                "user",
                "list",
            ]),
            &cmd,
        )
        .unwrap()
        .0;
        assert_eq!(strings(out)[1], "--db=/tmp/x.db");
    }

    #[test]
    fn a_switch_the_file_turns_on_is_turned_off_by_the_flag_with_false() {
        let f = write("plaintext = true\nmetrics-per-user = true\n");
        let cmd = crate::cli::RemoteCli::command();
        let run = |words: &[&str]| {
            let mut all = vec!["remote-proxy", "--config", f.to_str().unwrap(), "serve"];
            all.extend(words);
            strings(with_config(argv(&all), &cmd).unwrap().0)[4..].to_vec()
        };
        assert_eq!(run(&[]), ["--plaintext", "--metrics-per-user"]);
        assert_eq!(run(&["--plaintext=false"]), ["--metrics-per-user"]);
        assert_eq!(
            run(&["--plaintext=true", "--allow-signup=true"]),
            ["--metrics-per-user", "--plaintext", "--allow-signup"]
        );
        // Anything else stays for clap to refuse, and after `--` nothing is touched.
        assert_eq!(
            run(&["--plaintext=no", "--", "--plaintext=false"]),
            [
                "--metrics-per-user",
                "--plaintext=no",
                "--",
                "--plaintext=false"
            ]
        );
        // And without a file.
        let plain = with_config(argv(&["remote-proxy", "serve", "--plaintext=false"]), &cmd);
        assert_eq!(strings(plain.unwrap().0), ["remote-proxy", "serve"]);
    }

    #[test]
    fn mistakes_name_the_file_line_and_key() {
        let run = |text: &str| {
            let f = write(text);
            let argv = argv(&["remote-proxy", "--config", f.to_str().unwrap(), "serve"]);
            match parse::<crate::cli::RemoteCli>(argv) {
                Err(Ok(line)) => line.replace(f.to_str().unwrap(), "F"),
                Err(Err(e)) => panic!("clap's own error: {e}"),
                Ok(_) => panic!("accepted"),
            }
        };
        assert_eq!(
            run("listen = \"127.0.0.1:1\"\n\nmax-conections = 5\n"),
            "F:3: max-conections: unknown key (keys are the flags' long names, as in --help)"
        );
        let e = run("# limits\nmax-connections = \"lots\"\n");
        assert!(
            e.starts_with("F:2: max-connections: invalid value 'lots'"),
            "{e}"
        );
        assert_eq!(
            run("plaintext = \"yes\"\n"),
            "F:1: plaintext: takes true or false"
        );
        let e = run("listen = \"127.0.0.1:1\"\nthis is not toml\n");
        assert!(e.starts_with("F:2: "), "{e}");
        assert!(run("[serve]\nlisten = \"x\"\n").contains("sections are not used"));
    }

    #[test]
    fn local_proxy_flags_go_to_the_top_level_or_to_check_config() {
        let f = write("remote = [\"r:1\"]\nwarm = 2\n");
        let cmd = crate::cli::LocalCli::command();
        let p = f.to_str().unwrap();
        let out = strings(
            with_config(argv(&["local-proxy", "--config", p]), &cmd)
                .unwrap()
                .0,
        );
        assert_eq!(
            out,
            ["local-proxy", "--remote=r:1", "--warm=2", "--config", p]
        );
        let out = strings(
            with_config(argv(&["local-proxy", "check-config", "--config", p]), &cmd)
                .unwrap()
                .0,
        );
        assert_eq!(
            out,
            [
                "local-proxy",
                "check-config",
                "--remote=r:1",
                "--warm=2",
                "--config",
                p
            ]
        );
    }
}
