//! The object fast path across nodes: a node's object server in Rust, and its client.
//!
//! `dragon._objserver` (Python) serves every kind of shared object to processes of other
//! nodes. The operations a program repeats in a loop (a queue's send and receive, a lock's
//! acquire and release, a semaphore, an event, a `Value`'s bytes, a DDict manager's small
//! put and get) go through this server instead: its threads never take the GIL, and its
//! frames are fixed binary headers, so a remote call costs little more than a TCP round
//! trip. Both servers of a node share one ticket; the node table's `objects` entry names
//! both ports.
//!
//! Frames, little-endian, each prefixed by its body length as a `u64`:
//!
//! * connection: the client sends the ticket, the server answers `1`, or `2` when it moves
//!   large block messages by RMA (`rma`: its node's transport is `ofi`);
//! * request: `op u8, kind u8, flags u8 (1: may wait, 2: a block message, 4: by RMA), 0 u8, n u32,
//!   timeout f64 (negative: none), ref (segment u64, offset u64, len u64, gen u32), pool
//!   name length u16`, the pool name, then the payload (a message to send: a block message
//!   is read from the socket straight into a block);
//! * reply: `0 u8` then a value (`0` none, `1` false, `2` true, `3` + `u64`, `4` + inline
//!   message or bytes read, `5` + block message bytes, `6` + a DDict manager's working set
//!   `u64 u64`, found `u8`, the value's bytes, `7` + `u64`: an RMA offer, `8`: the offered
//!   message is in the client's block), or `1 u8` then an error (`1` + channel error
//!   code, `2` + sync error code, `3` + exception class; then its message).
//!
//! A server thread waiting for a client (a receive, an acquire, an event) looks every
//! [`SLICE`] whether the client is still there; one that left stops waiting, a message taken
//! for it goes back into its channel, and locks it held are released, as the Python server
//! does.
//!
//! Here: the wire's codes and errors. `server`: the listener, connections, framing and
//! replies; `calls`: the operations per kind of object; `rma`: large block messages over the
//! node transport; `client`: `objcall`.

mod calls;
mod client;
mod rma;
mod server;

pub(crate) use client::{objcall, objfast_rma_counts};
pub(crate) use rma::set_mover;
pub(crate) use server::{objserver_start, objserver_stop};

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dragon_shm::channel::{Channel, ChannelError, Message};
use dragon_shm::heap::AllocError;
use dragon_shm::kv::{Kv, KvError};
use dragon_shm::sync::{self, SyncError, WaitOpts};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3::IntoPyObjectExt;

use crate::blocking::Slice;
use crate::errors::{Class, Error, Result};
use crate::pool::{block_of, open_pool, PyBlock, PyPool};
use crate::segment::RefTuple;

/// How long a client looks for its reply, and a server thread for its client's next
/// request, before sleeping in `read`: `DRAGON_SOCKET_SPIN_US` microseconds if set, else
/// 50 µs when this process may run on more than one CPU and zero when it may run on only one
/// (affinity, quota). A reply that comes
/// back quickly is then read without a sleep and a wake-up, which on a small or virtual
/// machine cost more than the round trip itself; the spinner yields its CPU between looks.
fn socket_spin() -> Duration {
    use std::sync::OnceLock;
    static SPIN: OnceLock<Duration> = OnceLock::new();
    *SPIN.get_or_init(|| {
        if let Some(us) = std::env::var("DRAGON_SOCKET_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            return Duration::from_micros(us);
        }
        if std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
            Duration::from_micros(50)
        } else {
            Duration::ZERO
        }
    })
}

/// The largest request (bytes) after which a client spins for its reply.
const SPIN_REQUEST_MAX: usize = 64 << 10;

/// Looks, for at most [`socket_spin`], whether `s` has bytes to read (or its end was closed
/// or failed: the read that follows reports that), so that the read after it does not sleep.
/// A signal (EINTR) ends the look early: the read then waits as it would have.
fn spin_readable(s: &TcpStream) {
    let spin = socket_spin();
    if spin.is_zero() {
        return;
    }
    let end = Instant::now() + spin;
    loop {
        match peek(s) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            _ => return,
        }
        if Instant::now() >= end {
            return;
        }
        std::thread::yield_now();
    }
}

/// One look at `s` without waiting and without taking anything: `Ok(0)` when the peer
/// closed its end, `Ok(1)` when a byte waits, `WouldBlock` when nothing does yet. One
/// syscall (the socket stays in blocking mode).
fn peek(s: &TcpStream) -> io::Result<usize> {
    let mut b = 0u8;
    // SAFETY: the descriptor is `s`'s open socket for the whole call, and `b` is one
    // writable byte that outlives it; MSG_PEEK leaves the byte in the socket.
    let r = unsafe {
        libc::recv(
            s.as_raw_fd(),
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Writes `parts` in order as one stream, in as few `writev` calls as the socket takes. A
/// frame's header and its payload then leave in one segment (with `TCP_NODELAY`, two writes
/// are two segments, and a reader that woke for the first sleeps again for the second).
fn write_parts<'a>(s: &mut TcpStream, parts: impl IntoIterator<Item = &'a [u8]>) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'a>> = parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(io::IoSlice::new)
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match s.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How long a server thread waits for an object before looking whether its client left.
const SLICE: Duration = Duration::from_millis(250);
/// How long a client waits for a reply before running Python's signal handlers.
const CLIENT_SLICE: Duration = Duration::from_millis(100);
/// The ticket's length (`dragon._objserver.TICKET_LEN`).
const TICKET_LEN: usize = 16;
/// The largest request body a server reads (clients send larger messages the Python way).
const MAX_REQUEST: u64 = 4 << 20;
/// Bytes of a request before the pool name.
const HEAD: usize = 46;

const OP_SEND: u8 = 1;
const OP_RECV: u8 = 2;
const OP_LEN: u8 = 3;
const OP_ACQUIRE: u8 = 4;
const OP_RELEASE: u8 = 5;
const OP_VALUE: u8 = 6;
const OP_IS_MINE: u8 = 7;
const OP_SET: u8 = 8;
const OP_CLEAR: u8 = 9;
const OP_WAIT: u8 = 10;
const OP_KV_PUT_IN_RANGE: u8 = 11;
const OP_KV_RANGE_GET: u8 = 12;
const OP_LOCKED_RECV: u8 = 13;
const OP_LOCKED_SEND: u8 = 14;
const OP_READ: u8 = 15;
const OP_WRITE: u8 = 16;
const OP_LOCKED_READ: u8 = 17;
const OP_LOCKED_WRITE: u8 = 18;

/// Request flag: the call may wait.
const F_BLOCK: u8 = 1;
/// Request flag: the message goes as a block message (its bytes in the parts layout).
const F_AS_BLOCK: u8 = 2;
/// Request flag: a large block message moves by RMA (`rma`).
const F_RMA: u8 = 4;

const K_CHANNEL: u8 = 1;
const K_LOCK: u8 = 2;
const K_RLOCK: u8 = 3;
const K_SEM: u8 = 4;
const K_BSEM: u8 = 5;
const K_EVENT: u8 = 6;
const K_KV: u8 = 7;
const K_BLOCK: u8 = 8;

fn op_code(op: &str) -> Option<u8> {
    Some(match op {
        "send" => OP_SEND,
        "recv" => OP_RECV,
        "len" => OP_LEN,
        "acquire" => OP_ACQUIRE,
        "release" => OP_RELEASE,
        "value" => OP_VALUE,
        "is_mine" => OP_IS_MINE,
        "set" => OP_SET,
        "clear" => OP_CLEAR,
        "wait" => OP_WAIT,
        "put_in_range" => OP_KV_PUT_IN_RANGE,
        "range_and_get" => OP_KV_RANGE_GET,
        "locked_recv" => OP_LOCKED_RECV,
        "locked_send" => OP_LOCKED_SEND,
        "read" => OP_READ,
        "write" => OP_WRITE,
        "locked_read" => OP_LOCKED_READ,
        "locked_write" => OP_LOCKED_WRITE,
        _ => return None,
    })
}

fn kind_code(kind: &str) -> Option<u8> {
    Some(match kind {
        "Channel" => K_CHANNEL,
        "Lock" => K_LOCK,
        "RLock" => K_RLOCK,
        "Semaphore" => K_SEM,
        "BoundedSemaphore" => K_BSEM,
        "Event" => K_EVENT,
        "Kv" => K_KV,
        "Block" => K_BLOCK,
        _ => return None,
    })
}

// ----- errors on the wire ------------------------------------------------------------------

const CHANNEL_CODES: [ChannelError; 7] = [
    ChannelError::Full,
    ChannelError::Empty,
    ChannelError::Closed,
    ChannelError::TimedOut,
    ChannelError::PeerLost,
    ChannelError::TooLarge,
    ChannelError::Corrupt,
];

const SYNC_CODES: [SyncError; 5] = [
    SyncError::TimedOut,
    SyncError::Broken,
    SyncError::Overflow,
    SyncError::NotOwner,
    SyncError::NotHeld,
];

/// An error as the server sends it: (tag, code, message).
fn wire_error(e: &Error) -> (u8, u8, String) {
    match e {
        Error::Channel(ChannelError::Alloc(a)) => alloc_wire(a),
        Error::Channel(c) => match CHANNEL_CODES.iter().position(|x| x == c) {
            Some(i) => (1, i as u8, String::new()),
            None => (3, Class::Runtime as u8, c.to_string()),
        },
        Error::Sync(s) => match SYNC_CODES.iter().position(|x| x == s) {
            Some(i) => (2, i as u8, String::new()),
            None => (3, Class::Value as u8, s.to_string()),
        },
        Error::Raise(class, msg) => (3, *class as u8, msg.clone()),
        Error::Kv(KvError::Full) => (
            3,
            Class::DDictFull as u8,
            "the DDict manager's memory is full (delete keys or make the DDict larger)".into(),
        ),
        Error::Kv(KvError::Frozen) => (
            3,
            Class::DDictFrozen as u8,
            "the DDict is frozen (read-only): unfreeze() it to write".into(),
        ),
        Error::Kv(KvError::Alloc(a)) | Error::Alloc(a) => alloc_wire(a),
        e => (3, Class::Runtime as u8, e.to_string()),
    }
}

/// A pool's allocation error, as `errors.rs` raises it.
fn alloc_wire(a: &AllocError) -> (u8, u8, String) {
    let class = match a {
        AllocError::Full | AllocError::HoldTableFull | AllocError::ProcessTableFull => {
            Class::PoolFull
        }
        AllocError::TooLarge | AllocError::ZeroSize | AllocError::BadRef => Class::Value,
        AllocError::TimedOut => Class::Timeout,
        _ => Class::Runtime,
    };
    (3, class as u8, format!("dragon pool: {a}"))
}

/// The error a client raises for what the server sent.
fn error_of(tag: u8, code: u8, msg: &[u8]) -> Error {
    let msg = String::from_utf8_lossy(msg).into_owned();
    match tag {
        1 => match CHANNEL_CODES.get(code as usize) {
            Some(c) => Error::Channel(*c),
            None => Error::runtime(msg),
        },
        2 => match SYNC_CODES.get(code as usize) {
            Some(s) => Error::Sync(*s),
            None => Error::runtime(msg),
        },
        _ => Error::Raise(Class::from_code(code).unwrap_or(Class::Runtime), msg),
    }
}
