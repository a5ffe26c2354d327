//! The real binaries driven by the real curl, as a user would.

use crate::support::*;
use std::process::Command;

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn curl_through_the_real_binaries() {
    let p = binary_pair(&[]);
    let laddr = p.local_addr;
    let o = origin();
    let n = 3_000_000u64;
    let want = format!("{n} {:016x}", crate::support::origin::pattern_hash(n));
    let url = format!("http://localhost:{}/bytes/{n}", o.port());
    let proxy = laddr.to_string();
    let http_proxy = format!("http://{laddr}");
    for args in [
        vec!["--socks5-hostname", &proxy, &url],
        vec!["--socks5", &proxy, &url],
        vec!["-x", &http_proxy, &url],
        vec!["-p", "-x", &http_proxy, &url],
        vec!["--socks5-hostname", &proxy, "-U", "alice:pw", &url],
    ] {
        let mut full = vec!["-o", "-"];
        full.extend(args.iter().copied());
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "60"])
            .args(&full)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let h = crate::support::origin::fnv1a(crate::support::origin::FNV_START, &out.stdout);
        assert_eq!(format!("{} {h:016x}", out.stdout.len()), want, "{args:?}");
    }
    // Errors as curl reports them.
    let (code, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-x",
        &http_proxy,
        "-U",
        "alice:nope",
        &url,
    ]);
    assert_eq!(code, "407");
    let (_, err) = curl(&["--socks5-hostname", &proxy, "http://nothing.invalid/"]);
    assert!(
        err.contains("(97)") || err.to_lowercase().contains("host unreachable"),
        "{err}"
    );
}

#[test]
fn curl_says_a_wrong_socks5_password_was_rejected() {
    let p = binary_pair(&[]);
    let url = format!("http://localhost:{}/bytes/10", origin().port());
    let (_, err) = curl(&[
        "--socks5-hostname",
        &p.local_addr.to_string(),
        "-U",
        "alice:wrong",
        &url,
    ]);
    // curl's words for an RFC 1929 failure, not "Can't complete SOCKS5 connection".
    assert!(err.contains("rejected"), "{err}");
}
