//! Pipes for the splicing relay, and the pool of empty ones every tunnel draws from.
//!
//! A direction takes a pipe only while bytes are in it: from the splice that reads a chunk
//! until the splice that writes its last byte. Then the pipe, empty, goes back here. So an
//! idle tunnel holds no pipe at all, only its two sockets, and the number of pipes follows the
//! number of chunks in flight, not the number of tunnels (thousands of keep-alive tunnels
//! would otherwise need four pipe descriptors each and run a proxy out of descriptors).

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use parking_lot::Mutex;
use std::os::fd::OwnedFd;

/// Capacity of a new pipe, in bytes: the kernel's default, 16 pages.
pub const DEFAULT_PIPE: usize = 64 * 1024;

/// Largest pipe a bulk direction grows to, in bytes: the default fs.pipe-max-size.
pub const MAX_PIPE: usize = 1024 * 1024;

/// Empty default-size pipes kept for the next chunks. Making a pipe is `pipe2`, and dropping
/// it two `close`s: per direction per chunk, a large share of what a small request costs. An empty pipe holds no data pages (they are freed as they are
/// read), so a spare costs two descriptors and its slot array.
const SPARE_DEFAULT: usize = 64;

/// Empty grown pipes kept for bulk directions, so a bulk transfer does not grow a new pipe
/// for every chunk. Few: an unprivileged user's pipes share a page budget
/// (fs.pipe-user-pages-soft, 16 MiB-sized pipes' worth by default) that counts capacity,
/// empty or not.
const SPARE_GROWN: usize = 8;

/// Most pipe descriptors the pool holds while no byte is in flight.
pub const MAX_SPARE_PIPE_FDS: usize = 2 * (SPARE_DEFAULT + SPARE_GROWN);

static SPARE_DEFAULT_PIPES: Mutex<Vec<Pipe>> = parking_lot::const_mutex(Vec::new());
static SPARE_GROWN_PIPES: Mutex<Vec<Pipe>> = parking_lot::const_mutex(Vec::new());

/// A non-blocking pipe and how much it holds.
#[derive(Debug)]
pub struct Pipe {
    /// The end bytes are spliced out of.
    pub read: OwnedFd,
    /// The end bytes are spliced into.
    pub write: OwnedFd,
    /// Capacity in bytes: at most this much moves per splice.
    pub capacity: usize,
}

impl Pipe {
    /// Grows the pipe to [`MAX_PIPE`]: a splice filled it, so its direction carries bulk.
    /// Growing in one step was measured faster than in steps: on loopback a socket seldom
    /// holds a whole mid-size pipe at once, so the next step came late or never. If the
    /// kernel refuses (the user's pipe-page budget is spent), the pipe stays as it is, and
    /// `capacity` is raised anyway so the direction stops asking: it is only a cap on each
    /// splice, which moves what the pipe holds.
    pub fn grow(&mut self) {
        self.capacity = match fcntl(&self.read, FcntlArg::F_SETPIPE_SZ(MAX_PIPE as i32)) {
            Ok(got) => got as usize,
            Err(_) => MAX_PIPE,
        };
    }
}

/// An empty pipe: a grown spare first when `bulk`, else a default-size spare, else new.
///
/// # Errors
/// `pipe2` failed (out of descriptors).
pub fn take(bulk: bool) -> nix::Result<Pipe> {
    if bulk {
        if let Some(p) = SPARE_GROWN_PIPES.lock().pop() {
            return Ok(p);
        }
    }
    if let Some(p) = SPARE_DEFAULT_PIPES.lock().pop() {
        return Ok(p);
    }
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    Ok(Pipe {
        read,
        write,
        capacity: DEFAULT_PIPE,
    })
}

/// Returns a pipe that holds no bytes (the caller knows: every byte spliced in was spliced
/// out). A pipe with bytes left in it must be dropped instead: it would hand them to
/// another tunnel. Beyond the spares kept, the pipe is closed.
pub fn give_back(pipe: Pipe) {
    let (pool, cap) = if pipe.capacity > DEFAULT_PIPE {
        (&SPARE_GROWN_PIPES, SPARE_GROWN)
    } else {
        (&SPARE_DEFAULT_PIPES, SPARE_DEFAULT)
    };
    let mut spares = pool.lock();
    if spares.len() < cap {
        spares.push(pipe);
    }
}
