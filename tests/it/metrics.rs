//! `/metrics` on both binaries, scraped with curl, every line checked against the
//! Prometheus text format by a parser here; per-user series only with the flag, capped.

use crate::support::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;

/// The metrics address a binary logged ("metrics on http://ADDR/metrics").
fn metrics_addr(child: &ChildGuard) -> SocketAddr {
    let mut found = None;
    assert!(eventually(std::time::Duration::from_secs(5), || {
        found = child.log_lines("metrics on http://").first().and_then(|l| {
            let rest = l.split("metrics on http://").nth(1)?;
            rest.split('/').next()?.parse().ok()
        });
        found.is_some()
    }));
    found.unwrap()
}

/// `curl -s -w '\n%{http_code}' URL`: (status, body, content type).
fn curl(url: &str, method: &str) -> (u16, String, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-X",
            method,
            "-w",
            "\n%{http_code} %{content_type}",
            url,
        ])
        .output()
        .expect("curl is installed (.ci/run installs it)");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, tail) = text.rsplit_once('\n').unwrap();
    let (code, kind) = tail.split_once(' ').unwrap_or((tail, ""));
    (code.parse().unwrap(), body.to_string(), kind.to_string())
}

/// A series: name and labels.
type Series = (String, BTreeMap<String, String>);

/// Parses Prometheus text format 0.0.4 strictly: every line a HELP, a TYPE, or a sample of
/// a family whose TYPE came first, with well-formed names, labels and values.
fn parse(text: &str) -> Result<BTreeMap<Series, f64>, String> {
    let name_ok = |n: &str| {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |why: &str| Err(format!("line {}: {why}: {line:?}", i + 1));
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(n), _) if name_ok(n) => {}
                (Some("TYPE"), Some(n), Some(t))
                    if name_ok(n)
                        && ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) =>
                {
                    if types.insert(n.to_string(), t.to_string()).is_some() {
                        return bad("a second TYPE for one family");
                    }
                }
                _ => return bad("a comment that is neither HELP nor TYPE"),
            }
            continue;
        }
        let (series, value) = match line.rfind(' ') {
            Some(at) => (&line[..at], &line[at + 1..]),
            None => return bad("no value"),
        };
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse() {
                Ok(v) => v,
                Err(_) => return bad("value is not a number"),
            },
        };
        let (name, labels) = match series.find('{') {
            Some(at) => {
                let Some(inner) = series[at + 1..].strip_suffix('}') else {
                    return bad("labels not closed");
                };
                (&series[..at], inner)
            }
            None => (series, ""),
        };
        if !name_ok(name) {
            return bad("bad metric name");
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        if !types.contains_key(family) {
            return bad("a sample before its family's TYPE");
        }
        let mut map = BTreeMap::new();
        let mut rest = labels;
        while !rest.is_empty() {
            let Some((key, after)) = rest.split_once("=\"") else {
                return bad("label without =\"");
            };
            if !name_ok(key) {
                return bad("bad label name");
            }
            let mut val = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => val.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => val.push(c),
                        _ => return bad("bad escape in a label value"),
                    },
                    Some((j, '"')) => break j,
                    Some((_, c)) => val.push(c),
                    None => return bad("label value not closed"),
                }
            };
            map.insert(key.to_string(), val);
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        out.insert((name.to_string(), map), value);
    }
    Ok(out)
}

fn value(m: &BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    m.get(&(name.to_string(), want)).copied()
}

#[test]
fn both_binaries_serve_metrics_that_parse_and_count_what_happened() {
    let p = binary_pair(&["--metrics-listen", "127.0.0.1:0"]);
    let (remote, local) = (metrics_addr(&p.remote), metrics_addr(&p.local));
    let mut s = socks_connect(p.local_addr, Dest::Ip(origin()), None).unwrap();
    download_and_verify(&mut s, "o", 1_000_000);
    drop(s);
    // A refused tunnel: a wrong password, counted as such at both ends.
    assert!(socks_connect(p.local_addr, Dest::Ip(origin()), Some(("alice", "nope"))).is_err());
    for (who, addr) in [("remote", remote), ("local", local)] {
        let url = format!("http://{addr}/metrics");
        let mut m = BTreeMap::new();
        // Bytes are counted as they move; the gauge of open tunnels falls once it closed.
        let settled = eventually(std::time::Duration::from_secs(5), || {
            let (code, body, kind) = curl(&url, "GET");
            assert_eq!(code, 200, "{who}: {body}");
            assert!(
                kind.starts_with("text/plain; version=0.0.4"),
                "{who}: {kind}"
            );
            m = parse(&body).unwrap_or_else(|e| panic!("{who}: {e}\n{body}"));
            value(&m, "flowgate_tunnels_open", &[]) == Some(0.0)
        });
        assert!(settled, "{who}: {m:?}");
        let ok = value(&m, "flowgate_tunnels_total", &[("outcome", "ok")]).unwrap_or(0.0);
        assert!(ok >= 1.0, "{who}: {m:?}");
        let down = value(&m, "flowgate_bytes_total", &[("direction", "down")]).unwrap();
        assert!(down >= 1_000_000.0, "{who}: {down}");
        assert!(value(&m, "flowgate_slots_in_use", &[]).is_some(), "{who}");
        assert!(value(&m, "flowgate_queue_length", &[]).is_some(), "{who}");
        assert!(
            value(&m, "flowgate_queue_wait_seconds_count", &[]).unwrap_or(0.0) >= 1.0,
            "{who}"
        );
        // No per-user series without --metrics-per-user.
        assert!(
            !m.keys().any(|(n, _)| n.starts_with("flowgate_user_")),
            "{who}"
        );
        // Nothing else is served there.
        assert_eq!(curl(&format!("http://{addr}/"), "GET").0, 404);
        assert_eq!(curl(&url, "POST").0, 405);
    }
    let (_, body, _) = curl(&format!("http://{remote}/metrics"), "GET");
    let m = parse(&body).unwrap();
    assert!(value(&m, "flowgate_failed_logins_total", &[]).unwrap() >= 1.0);
    assert!(value(&m, "flowgate_argon2_checks_total", &[]).unwrap() >= 1.0);
    let (_, body, _) = curl(&format!("http://{local}/metrics"), "GET");
    let m = parse(&body).unwrap();
    let r = p.remote_addr.to_string();
    assert_eq!(
        value(&m, "flowgate_remote_up", &[("remote", &r)]),
        Some(1.0),
        "{body}"
    );
    assert!(value(&m, "flowgate_remote_tunnels_total", &[("remote", &r)]).unwrap() >= 1.0);
    assert!(
        value(
            &m,
            "flowgate_tunnels_total",
            &[("outcome", "bad_credentials")]
        )
        .unwrap()
            >= 1.0
    );
    assert!(value(&m, "flowgate_remote_probe_seconds_count", &[("remote", &r)]).unwrap() >= 1.0);
}

#[test]
fn per_user_series_need_the_flag_and_respect_the_cap() {
    let mut policy = allow_loopback();
    policy.extend(
        [
            "--metrics-per-user",
            "--metrics-max-users",
            "2",
            "--metrics-listen",
            "0",
        ]
        .map(String::from),
    );
    let p = binary_pair_with_policy(&policy, &[]);
    for (name, pw) in [("bob", "pw2"), ("carol", "pw3")] {
        cli_user_add(&p.db, name, pw, "unlimited");
    }
    let remote = metrics_addr(&p.remote);
    // alice moves the most, then bob, then carol: carol is summed into "other".
    for (creds, n) in [
        (None, 300_000),
        (Some(("bob", "pw2")), 200_000),
        (Some(("carol", "pw3")), 100_000),
    ] {
        let ok = eventually(std::time::Duration::from_secs(3), || {
            socks_connect(p.local_addr, Dest::Ip(origin()), creds).is_ok()
        });
        assert!(ok, "{creds:?}");
        let mut s = socks_connect(p.local_addr, Dest::Ip(origin()), creds).unwrap();
        download_and_verify(&mut s, "o", n);
    }
    let (_, body, _) = curl(&format!("http://{remote}/metrics"), "GET");
    let m = parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let users: std::collections::BTreeSet<&str> = m
        .keys()
        .filter(|(n, _)| n == "flowgate_user_bytes_total")
        .map(|(_, l)| l["user"].as_str())
        .collect();
    assert_eq!(users, ["alice", "bob", "other"].into(), "{body}");
    let carol = value(
        &m,
        "flowgate_user_bytes_total",
        &[("direction", "down"), ("user", "other")],
    );
    assert!(carol.unwrap() >= 100_000.0, "{body}");
}

#[test]
fn the_format_parser_refuses_what_prometheus_would() {
    assert!(parse("# TYPE a gauge\na{x=\"1\",y=\"q\\\"\"} 2.5\n").is_ok());
    for bad in [
        "a 1",                            // no TYPE
        "# TYPE a gauge\na{x=\"1} 1",     // label not closed
        "# TYPE a gauge\na{x=1} 1",       // unquoted value
        "# TYPE a gauge\na one",          // not a number
        "# TYPE a gauge\n# TYPE a gauge", // two TYPEs
        "# TYPE 1a gauge",                // bad name
        "# NOTE a",                       // unknown comment
    ] {
        assert!(parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn a_metrics_port_in_use_stops_start_before_the_listening_line() {
    // Scripts take "listening on" to mean the server is up: a start that fails later must
    // not have printed it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = taken.local_addr().unwrap().to_string();
    let db = users_db(&[user("alice", "pw", "unlimited")]);
    let mut remote = remote_bin();
    remote
        .arg("--db")
        .arg(&db)
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", &at]);
    let mut local = local_bin();
    local.args([
        "--listen",
        "127.0.0.1:0",
        "--remote",
        "127.0.0.1:9",
        "--plaintext",
        "--metrics-listen",
        &at,
    ]);
    for (who, mut cmd) in [("remote", remote), ("local", local)] {
        let out = cmd
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{who}: {err}");
        assert!(
            err.contains(&format!("cannot listen on {at}")),
            "{who}: {err}"
        );
        assert!(!err.contains("-proxy listening on"), "{who}: {err}");
    }
}
