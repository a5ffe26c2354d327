//! The PostgreSQL password as libpq finds it: `PGPASSWORD`, else the first matching line of
//! `PGPASSFILE` or `~/.pgpass` (`hostname:port:database:username:password`, `*` matches
//! anything, `\:` and `\\` escape), which is ignored unless only its owner can read it.

use std::path::{Path, PathBuf};

/// Where to look: `PGPASSFILE`, else `~/.pgpass`.
pub fn default_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PGPASSFILE") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass"))
}

/// The password for this connection, if `PGPASSWORD` or the file has one.
pub fn lookup(host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    if let Ok(p) = std::env::var("PGPASSWORD") {
        return Some(p);
    }
    let file = default_file()?;
    if !private(&file) {
        if file.exists() {
            log::warn!(
                "ignoring {}: it can be read by others (chmod 600 it)",
                file.display()
            );
        }
        return None;
    }
    let text = std::fs::read_to_string(&file).ok()?;
    find(&text, host, port, database, user)
}

fn private(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o077 == 0)
}

/// The password of the first line of a `.pgpass` text matching the connection.
pub fn find(text: &str, host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .find_map(|line| {
            let fields = split(line);
            let [h, p, d, u, pw] = <[String; 5]>::try_from(fields).ok()?;
            let ok = |pattern: &str, value: &str| pattern == "*" || pattern == value;
            (ok(&h, host) && ok(&p, &port) && ok(&d, database) && ok(&u, user)).then_some(pw)
        })
}

/// Splits a line at unescaped colons, undoing `\:` and `\\`; the last field takes the rest.
fn split(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(n), Some(f)) = (chars.next(), fields.last_mut()) {
                    f.push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(f) = fields.last_mut() {
                    f.push(c);
                }
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_line_wins_with_wildcards_and_escapes() {
        let text = "# comment\n\
                    db.example:5432:other:flowgate:nope\n\
                    db.example:*:flowgate:flowgate:s3cr\\:et\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            find(text, "db.example", 5432, "flowgate", "flowgate").as_deref(),
            Some("s3cr:et")
        );
        assert_eq!(
            find(text, "elsewhere", 6543, "x", "y").as_deref(),
            Some("fallback")
        );
        assert_eq!(find("a:1:b:c:d\n", "a", 2, "b", "c"), None);
        assert_eq!(find("too:few:fields\n", "too", 5432, "x", "y"), None);
    }
}
