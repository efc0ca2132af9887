//! Connections: listening, accepting (authentication on its own thread, within the handshake
//! timeout) and dialing, installing and looking up peers, losing a peer, closing the endpoint.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::state::{Inner, OutQ, Peer, Pending};
use crate::common::lock;
use crate::{auth, Event, NodeId, PeerAddr, Result, TransportError};

/// A stream whose reads and writes all end by one deadline (handshakes).
pub(crate) struct DeadlineStream<'a> {
    pub(crate) s: &'a TcpStream,
    pub(crate) deadline: Instant,
}

impl DeadlineStream<'_> {
    fn remaining(&self) -> io::Result<Duration> {
        let now = Instant::now();
        if now >= self.deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok((self.deadline - now).max(Duration::from_millis(1)))
    }
}

impl Read for DeadlineStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.s.set_read_timeout(Some(self.remaining()?))?;
        (&mut &*self.s).read(buf)
    }
}

impl Write for DeadlineStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.s.set_write_timeout(Some(self.remaining()?))?;
        (&mut &*self.s).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Inner {
    pub(super) fn listen_loop(self: Arc<Self>) {
        loop {
            let r = self.listener.accept();
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            match r {
                Ok((s, _)) => self.spawn("dt-auth", move |me| me.accept_one(s)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Out of descriptors or similar: back off instead of spinning.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    pub(super) fn accept_one(self: Arc<Self>, s: TcpStream) {
        let id = self.next_hs.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = s.try_clone() {
            lock(&self.handshaking).insert(id, c);
        }
        if self.closed.load(Ordering::Acquire) {
            lock(&self.handshaking).remove(&id);
            return;
        }
        let _ = s.set_nodelay(true);
        let r = auth::server_handshake(
            &mut DeadlineStream {
                s: &s,
                deadline: Instant::now() + self.cfg.handshake_timeout,
            },
            &self.cfg.secret,
            self.cfg.node,
        );
        lock(&self.handshaking).remove(&id);
        match r {
            Ok(peer) if peer != self.cfg.node => {
                let _ = self.install(peer, s);
            }
            _ => {
                self.auth_failures.fetch_add(1, Ordering::Relaxed);
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Makes an authenticated connection the one to `id`.
    pub(super) fn install(self: &Arc<Self>, id: NodeId, s: TcpStream) -> Result<()> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(self.cfg.peer_timeout))?;
        s.set_write_timeout(Some(self.cfg.peer_timeout))?;
        let reader = s.try_clone()?;
        let ctl = s.try_clone()?;
        let peer = Arc::new(Peer {
            id,
            ctl,
            sock: Mutex::new(s),
            q: Mutex::new(OutQ::default()),
            q_cv: Condvar::new(),
            credits: Mutex::new(self.cfg.queue_depth as u64),
            credit_cv: Condvar::new(),
            lost: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            last_tx: AtomicU64::new(self.now_ms()),
            consumed: AtomicU64::new(0),
            unconsumed: AtomicU64::new(0),
        });
        let mut peers = lock(&self.peers);
        let dup = peers
            .get(&id)
            .is_some_and(|old| !old.lost.load(Ordering::Acquire));
        if self.closed.load(Ordering::Acquire) || dup {
            let _ = peer.ctl.shutdown(Shutdown::Both);
            return Err(if dup {
                TransportError::Protocol("duplicate connection")
            } else {
                TransportError::Closed
            });
        }
        peers.insert(id, peer.clone());
        let p2 = peer.clone();
        self.spawn("dt-read", move |me| me.reader_loop(p2, reader));
        self.spawn("dt-write", move |me| me.writer_loop(peer));
        drop(peers);
        self.peers_cv.notify_all();
        Ok(())
    }

    pub(super) fn dial(self: &Arc<Self>, p: &PeerAddr, deadline: Instant) -> Result<()> {
        let addrs: Vec<SocketAddr> = p
            .addr
            .to_socket_addrs()
            .map_err(|_| TransportError::Protocol("bad peer address"))?
            .collect();
        let addr = *addrs
            .first()
            .ok_or(TransportError::Protocol("bad peer address"))?;
        let s = loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::TimedOut);
            }
            match TcpStream::connect_timeout(&addr, deadline - now) {
                Ok(s) => break s,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    // The peer's listener is not up yet: retry until the deadline.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        s.set_nodelay(true)?;
        let hs_deadline = deadline.min(Instant::now() + self.cfg.handshake_timeout);
        let got = auth::client_handshake(
            &mut DeadlineStream {
                s: &s,
                deadline: hs_deadline,
            },
            &self.cfg.secret,
            self.cfg.node,
            Some(p.node),
        )?;
        self.install(got, s)
    }

    pub(super) fn peer(&self, id: NodeId) -> Result<Arc<Peer>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        lock(&self.peers)
            .get(&id)
            .cloned()
            .ok_or(TransportError::UnknownPeer)
    }

    pub(super) fn lost_err(&self) -> TransportError {
        if self.closed.load(Ordering::Acquire) {
            TransportError::Closed
        } else {
            TransportError::PeerLost
        }
    }

    /// Turns the connection to `p` down and fails everything pending towards it.
    pub(super) fn lose(&self, p: &Arc<Peer>) {
        if p.lost.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = p.ctl.shutdown(Shutdown::Both);
        let err = self.lost_err();
        {
            let mut q = lock(&p.q);
            q.closed = true;
            q.small.clear();
            q.bulk.clear();
        }
        p.q_cv.notify_all();
        drop(lock(&p.credits));
        p.credit_cv.notify_all();
        let pend: Vec<Pending> = lock(&p.pending).drain().map(|(_, v)| v).collect();
        for x in pend {
            match x {
                Pending::Put(c) => c.complete(Err(err)),
                Pending::Get { done, .. } => done.complete(Err(err)),
            }
        }
        if !self.closed.load(Ordering::Acquire) {
            self.push_event(Event::PeerLost { peer: p.id }, None);
        }
        drop(lock(&self.peers));
        self.peers_cv.notify_all();
    }

    pub(super) fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: the listener is owned by `self`, so its descriptor is open; shutting a
        // listening socket down makes a blocked accept() return (Linux).
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for (_, s) in lock(&self.handshaking).drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let peers: Vec<Arc<Peer>> = lock(&self.peers).values().cloned().collect();
        for p in &peers {
            self.lose(p);
        }
        drop(lock(&self.inbox));
        self.inbox_cv.notify_all();
        drop(lock(&self.peers));
        self.peers_cv.notify_all();
        let me = std::thread::current().id();
        loop {
            let hs: Vec<JoinHandle<()>> = lock(&self.threads).drain(..).collect();
            if hs.is_empty() {
                break;
            }
            for h in hs {
                if h.thread().id() != me {
                    let _ = h.join();
                }
            }
        }
        lock(&self.inbox).clear();
        self.queued.store(0, Ordering::Release);
    }
}
