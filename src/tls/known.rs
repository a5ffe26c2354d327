//! The known-remotes file: which identity local-proxy accepts for each remote when no pin
//! or CA is given, recorded by `local-proxy trust` (trust on first use, as SSH's
//! known_hosts).
//!
//! One remote per line, `HOST:PORT sha256:<hex>`; several lines for one remote all count
//! (for a key rotation); `#` starts a comment.

use super::{Error, Fingerprint};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};

/// Where the file is unless `--known-remotes` says otherwise: the user's config directory.
pub fn default_known_remotes_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    match base {
        Some(b) => b.join("flowgate").join("known_remotes"),
        None => PathBuf::from("flowgate-known-remotes"),
    }
}

/// The parsed file; re-read when a remote is not found in it (it may just have been trusted
/// by `local-proxy trust` while this local-proxy runs).
#[derive(Debug)]
pub struct KnownRemotes {
    path: PathBuf,
    entries: Mutex<Vec<(String, Fingerprint)>>,
}

impl KnownRemotes {
    /// Reads `path`; a missing file is an empty one.
    ///
    /// # Errors
    /// `Io` when it cannot be read, `Pem` (with the line) when a line is not an entry.
    pub fn open(path: &Path) -> Result<KnownRemotes, Error> {
        let entries = read(path)?;
        Ok(KnownRemotes {
            path: path.to_path_buf(),
            entries: Mutex::new(entries),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The identities recorded for `remote`.
    pub fn lookup(&self, remote: &str) -> Vec<Fingerprint> {
        lookup(&self.entries.lock(), remote)
    }

    /// Reads the file again (a bad file keeps what was read before, with a warning).
    pub fn reload(&self) {
        match read(&self.path) {
            Ok(e) => *self.entries.lock() = e,
            Err(e) => log::warn!("cannot re-read known remotes: {e}"),
        }
    }

    /// Records `fp` as `remote`'s identity, replacing what was recorded for it; returns the
    /// identities it replaces.
    ///
    /// # Errors
    /// `Io` when the file or its directory cannot be written.
    pub fn record(&self, remote: &str, fp: Fingerprint) -> Result<Vec<Fingerprint>, Error> {
        let mut entries = self.entries.lock();
        *entries = read(&self.path)?;
        let old = lookup(&entries, remote);
        entries.retain(|(r, _)| r != remote);
        entries.push((remote.to_string(), fp));
        let io = |e| Error::Io(self.path.clone(), e);
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::Io(dir.to_path_buf(), e))?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, format(&entries)).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        Ok(old)
    }
}

fn read(path: &Path) -> Result<Vec<(String, Fingerprint)>, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text).map_err(|e| Error::Pem(path.to_path_buf(), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::Io(path.to_path_buf(), e)),
    }
}

fn lookup(entries: &[(String, Fingerprint)], remote: &str) -> Vec<Fingerprint> {
    entries
        .iter()
        .filter(|(r, _)| r == remote)
        .map(|(_, f)| *f)
        .collect()
}

/// Parses the file's text.
///
/// # Errors
/// The first line that is not `HOST:PORT sha256:<hex>`, a comment or blank.
pub(crate) fn parse(text: &str) -> Result<Vec<(String, Fingerprint)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(remote), Some(fp), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("line {}: expected HOST:PORT sha256:<hex>", i + 1));
        };
        if !remote.contains(':') {
            return Err(format!("line {}: {remote:?} is not HOST:PORT", i + 1));
        }
        let fp = fp.parse().map_err(|e| format!("line {}: {e}", i + 1))?;
        out.push((remote.to_string(), fp));
    }
    Ok(out)
}

fn format(entries: &[(String, Fingerprint)]) -> String {
    let mut s = String::from(
        "# Remote-proxies this local-proxy trusts: HOST:PORT sha256:<certificate hash>.\n\
         # Added by `local-proxy trust HOST:PORT`.\n",
    );
    for (r, f) in entries {
        s.push_str(&std::format!("{r} {f}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_parses_with_comments_and_several_identities_per_remote() {
        let a = Fingerprint([1; 32]);
        let b = Fingerprint([2; 32]);
        let text = format!("# comment\n\nproxy.example:7080 {a}  # old key\nproxy.example:7080 {b}\n[::1]:7080 {b}\n");
        let e = parse(&text).unwrap();
        assert_eq!(lookup(&e, "proxy.example:7080"), vec![a, b]);
        assert_eq!(lookup(&e, "[::1]:7080"), vec![b]);
        assert!(lookup(&e, "proxy.example:7081").is_empty());
        assert_eq!(parse(&format(&e)).unwrap(), e);
    }

    #[test]
    fn a_bad_line_is_named() {
        let err = parse("ok.example:1 sha256:00\n").unwrap_err();
        assert!(err.starts_with("line 1:"), "{err}");
        let err = parse(&format!("\nnoport {}\n", Fingerprint([0; 32]))).unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        assert!(parse("a:1 sha256:x extra\n").is_err());
    }

    #[test]
    fn recording_replaces_a_remotes_identity_and_keeps_the_others() {
        let dir = std::env::temp_dir().join(format!("flowgate-known-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("known_remotes");
        let k = KnownRemotes::open(&path).unwrap();
        assert!(k.lookup("a:1").is_empty());
        let (x, y) = (Fingerprint([7; 32]), Fingerprint([8; 32]));
        assert!(k.record("a:1", x).unwrap().is_empty());
        k.record("b:2", x).unwrap();
        assert_eq!(k.record("a:1", y).unwrap(), vec![x]);
        let again = KnownRemotes::open(&path).unwrap();
        assert_eq!(again.lookup("a:1"), vec![y]);
        assert_eq!(again.lookup("b:2"), vec![x]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
