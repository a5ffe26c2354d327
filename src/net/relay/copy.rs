//! The copying relay, for sockets splice(2) cannot serve: each direction on its own thread,
//! through a user-space buffer.

use super::{shutdown_both, Activity, Options, Payer, Stats};
use crate::limit::meter::Direction;
use crate::net::workers::Workers;
use crate::proto::is_timeout;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// First read buffer of a direction, in bytes; small so idle tunnels stay cheap.
pub const INITIAL_BUFFER: usize = 16 * 1024;
/// Largest read buffer, in bytes: the knee for bulk copies (docs/benchmarks.md).
pub const MAX_BUFFER: usize = 256 * 1024;

enum End {
    /// EOF read and passed on as a half-close.
    Eof,
    /// Closed for idleness.
    Idle,
    /// A read or write failed; both sockets were shut down.
    Failed,
    /// The user's quota is used up: reading stopped and the FIN was passed on.
    QuotaUsedUp,
}

/// The copying relay: each direction on its own thread, for sockets splice(2) cannot serve.
pub(super) fn relay_threaded(
    client: TcpStream,
    target: TcpStream,
    opts: &Options,
    workers: &Workers,
) -> Stats {
    let client = Arc::new(client);
    let target = Arc::new(target);
    if let Some(idle) = opts.idle_timeout {
        // The read timeout is how a blocked read notices idleness; check a few times per
        // period so an idle tunnel closes close to on time.
        let tick = (idle / 4).max(Duration::from_millis(50));
        let _ = client.set_read_timeout(Some(tick));
        let _ = target.set_read_timeout(Some(tick));
        // A peer that stops reading for the whole idle period is as dead as a silent one.
        let _ = client.set_write_timeout(Some(idle));
        let _ = target.set_write_timeout(Some(idle));
    } else {
        let _ = client.set_read_timeout(None);
        let _ = target.set_read_timeout(None);
    }
    let activity = Arc::new(Activity::new());
    let (done_tx, done_rx) = crossbeam_channel::bounded::<(u64, End)>(1);
    {
        let (src, dst) = (Arc::clone(&client), Arc::clone(&target));
        let (bucket, meter, idle, act) = (
            opts.bucket.clone(),
            opts.meter.clone(),
            opts.idle_timeout,
            Arc::clone(&activity),
        );
        workers.spawn(move || {
            let payer = Payer {
                bucket: bucket.as_ref(),
                meter: meter.as_ref(),
            };
            let r = pump(&src, &dst, payer, Direction::Up, idle, &act);
            let _ = done_tx.send(r);
        });
    }
    let (down, down_end) = pump(
        &target,
        &client,
        Payer::of(opts),
        Direction::Down,
        opts.idle_timeout,
        &activity,
    );
    let (up, up_end) = match done_rx.recv() {
        Ok(r) => r,
        // The job panicked; its socket halves are shut down by the drop below.
        Err(_) => (0, End::Failed),
    };
    let idle_closed = matches!(down_end, End::Idle) || matches!(up_end, End::Idle);
    let quota_closed = matches!(down_end, End::QuotaUsedUp) || matches!(up_end, End::QuotaUsedUp);
    Stats {
        up,
        down,
        idle_closed,
        quota_closed,
    }
}

/// One direction: read from `src`, pay the bucket, write to `dst`, until EOF or error.
fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    payer: Payer<'_>,
    dir: Direction,
    idle: Option<Duration>,
    activity: &Activity,
) -> (u64, End) {
    let _registered = payer.bucket.map(|b| b.register());
    let mut buf = vec![0u8; INITIAL_BUFFER];
    let mut total = 0u64;
    let mut reader = src;
    let mut writer = dst;
    loop {
        let limit = payer.limit(buf.len());
        if limit == 0 {
            // Read no more, as at EOF; the other direction stops at its next read.
            let _ = dst.shutdown(Shutdown::Write);
            return (total, End::QuotaUsedUp);
        }
        let n = match reader.read(&mut buf[..limit]) {
            Ok(0) => {
                // Pass the FIN on; the other direction may still have bytes to carry.
                let _ = dst.shutdown(Shutdown::Write);
                return (total, End::Eof);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => {
                if let Some(limit) = idle {
                    if activity.idle_for() >= limit {
                        shutdown_both(src, dst);
                        return (total, End::Idle);
                    }
                }
                continue;
            }
            Err(e) => {
                log::trace!("relay read failed: {e}");
                shutdown_both(src, dst);
                return (total, End::Failed);
            }
        };
        payer.pay(dir, n);
        if let Err(e) = writer.write_all(&buf[..n]) {
            log::trace!("relay write failed: {e}");
            shutdown_both(src, dst);
            return (total, End::Failed);
        }
        total += n as u64;
        activity.touch();
        // Grow when a read filled the whole buffer: the peer has more than we can take.
        if n == buf.len() && buf.len() < MAX_BUFFER {
            buf.resize(buf.len() * 2, 0);
        }
    }
}
