//! Peers over the side channel: listening, accepting and dialing (authentication, then the
//! hello exchange), installing and looking up peers, losing a peer, closing the endpoint.

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::peer::{Peer, Pending, Region, RxState};
use super::state::{Counted, Inner, Post, XferKind};
use super::{random_nonzero, side};
use crate::common::{self, lock, wait_until};
use crate::{auth, Event, NodeId, PeerAddr, Result, TransportError};

impl Inner {
    pub(super) fn listen_loop(self: Arc<Self>) {
        loop {
            let r = self.listener.accept();
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            match r {
                Ok((s, _)) => self.spawn("dt-ofi-auth", move |me| me.accept_one(s)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    pub(super) fn my_hello(&self, token: u64) -> side::Hello {
        side::Hello {
            provider: self.ep.attrs.prov.clone(),
            addr: self.my_addr.clone(),
            base: self.pool_base,
            len: self.pool_len,
            key: self.pool_key,
            token,
            max_message: self.cfg.max_message as u64,
            queue_depth: self.cfg.queue_depth as u64,
        }
    }

    /// A peer from its (authenticated) hello: its address goes into the AV.
    pub(super) fn make_peer(
        &self,
        id: NodeId,
        h: &side::Hello,
        rx_token: u64,
        side: TcpStream,
    ) -> Result<Arc<Peer>> {
        if h.provider != self.ep.attrs.prov {
            return Err(TransportError::Protocol("peer uses another provider"));
        }
        let fi_addr = {
            let st = lock(&self.st);
            if st.dead {
                return Err(TransportError::Closed);
            }
            self.ep
                .av_insert(&h.addr)
                .map_err(|_| TransportError::Protocol("bad fabric address"))?
        };
        // Both sides use the smaller window, so credit batches and checks agree.
        let window = h.queue_depth.min(self.cfg.queue_depth as u64);
        Ok(Arc::new(Peer {
            id,
            fi_addr,
            tx_token: h.token,
            rx_token,
            region: Region {
                base: h.base,
                len: h.len,
                key: h.key,
            },
            max_message: (h.max_message.min(usize::MAX as u64) as usize).min(self.cfg.max_message),
            window,
            side,
            lost: AtomicBool::new(false),
            credits: Mutex::new(window),
            credit_cv: Condvar::new(),
            consumed: AtomicU64::new(0),
            unconsumed: AtomicU64::new(0),
            tx_seq: AtomicU64::new(0),
            rx: Mutex::new(RxState::default()),
            puts: Mutex::new(VecDeque::new()),
            pending: Mutex::new(Counted::new(&self.inflight)),
            exposed: Mutex::new(Counted::new(&self.inflight)),
        }))
    }

    pub(super) fn register_token(&self, p: &Arc<Peer>) {
        lock(&self.tokens).insert(p.rx_token, p.clone());
    }

    pub(super) fn forget_token(&self, p: &Arc<Peer>) {
        let mut t = lock(&self.tokens);
        if t.get(&p.rx_token).is_some_and(|x| Arc::ptr_eq(x, p)) {
            t.remove(&p.rx_token);
        }
    }

    /// Makes `p` the peer of its node and starts its side-channel reader.
    pub(super) fn install(self: &Arc<Self>, p: Arc<Peer>, reader: TcpStream) -> Result<()> {
        reader.set_read_timeout(Some(self.cfg.peer_timeout))?;
        let mut peers = lock(&self.peers);
        let dup = peers
            .get(&p.id)
            .is_some_and(|old| !old.lost.load(Ordering::Acquire));
        if self.closed.load(Ordering::Acquire) || dup {
            drop(peers);
            self.forget_token(&p);
            let _ = p.side.shutdown(Shutdown::Both);
            return Err(if dup {
                TransportError::Protocol("duplicate connection")
            } else {
                TransportError::Closed
            });
        }
        peers.insert(p.id, p.clone());
        self.spawn("dt-ofi-side", move |me| me.side_loop(p, reader));
        drop(peers);
        self.peers_cv.notify_all();
        Ok(())
    }

    pub(super) fn side_loop(self: Arc<Self>, p: Arc<Peer>, mut s: TcpStream) {
        while let Ok((side::HEARTBEAT, 0)) = side::read_header(&mut s, 0) {}
        self.lose(&p);
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
        let mut ds = crate::tcp::DeadlineStream {
            s: &s,
            deadline: Instant::now() + self.cfg.handshake_timeout,
        };
        let r = (|| -> Result<()> {
            let client = auth::server_handshake(&mut ds, &self.cfg.secret, self.cfg.node)?;
            if client == self.cfg.node || common::is_live(&self.peers, client) {
                return Err(TransportError::Protocol("unexpected node id"));
            }
            let theirs = side::read_hello(&mut ds)?;
            let rx_token = random_nonzero();
            let p = self.make_peer(client, &theirs, rx_token, s.try_clone()?)?;
            // From here on the dialer's fabric messages are accepted: it sends only after it
            // has our hello, which follows.
            self.register_token(&p);
            lock(&self.joining).insert(client);
            let r = side::write_frame(&mut ds, side::HELLO, &self.my_hello(rx_token).encode())
                .and_then(|()| side::read_ready(&mut ds))
                .and_then(|()| Ok(s.try_clone()?))
                .and_then(|reader| self.install(p.clone(), reader));
            if r.is_err() {
                self.forget_token(&p);
            }
            lock(&self.joining).remove(&client);
            drop(lock(&self.peers));
            self.peers_cv.notify_all();
            r
        })();
        lock(&self.handshaking).remove(&id);
        if r.is_err() {
            self.auth_failures.fetch_add(1, Ordering::Relaxed);
            let _ = s.shutdown(Shutdown::Both);
        }
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
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        s.set_nodelay(true)?;
        let mut ds = crate::tcp::DeadlineStream {
            s: &s,
            deadline: deadline.min(Instant::now() + self.cfg.handshake_timeout),
        };
        let got = auth::client_handshake(&mut ds, &self.cfg.secret, self.cfg.node, Some(p.node))?;
        let rx_token = random_nonzero();
        side::write_frame(&mut ds, side::HELLO, &self.my_hello(rx_token).encode())?;
        let theirs = side::read_hello(&mut ds)?;
        let peer = self.make_peer(got, &theirs, rx_token, s.try_clone()?)?;
        self.register_token(&peer);
        if let Err(e) = self.install(peer.clone(), s.try_clone()?) {
            self.forget_token(&peer);
            return Err(e);
        }
        if let Err(e) = side::write_frame(&mut ds, side::READY, &[]) {
            self.lose(&peer);
            return Err(e);
        }
        Ok(())
    }

    /// The peer `id`. A peer still joining (its frames may already have arrived: the dialer
    /// starts sending as soon as it has our hello, and its `READY` comes on another channel)
    /// is waited for, up to the handshake timeout.
    pub(super) fn peer(&self, id: NodeId) -> Result<Arc<Peer>> {
        let deadline = Instant::now() + self.cfg.handshake_timeout;
        let mut g = lock(&self.peers);
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(TransportError::Closed);
            }
            if let Some(p) = g.get(&id) {
                return Ok(p.clone());
            }
            if !lock(&self.joining).contains(&id) {
                return Err(TransportError::UnknownPeer);
            }
            g = wait_until(&self.peers_cv, g, Some(deadline))
                .map_err(|_| TransportError::UnknownPeer)?;
        }
    }

    pub(super) fn lost_err(&self) -> TransportError {
        if self.closed.load(Ordering::Acquire) {
            TransportError::Closed
        } else {
            TransportError::PeerLost
        }
    }

    /// Turns peer `p` down and fails everything pending towards it.
    pub(super) fn lose(&self, p: &Arc<Peer>) {
        if p.lost.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::debug!(node = self.cfg.node.0, peer = p.id.0, "ofi: peer lost");
        let _ = p.side.shutdown(Shutdown::Both);
        self.forget_token(p);
        drop(lock(&p.credits));
        p.credit_cv.notify_all();
        let err = self.lost_err();
        let pend: Vec<Pending> = lock(&p.pending).take_all();
        for x in pend {
            match x {
                Pending::Put { done, .. } | Pending::Get { done, .. } => done.complete(Err(err)),
            }
        }
        drop(lock(&p.exposed).take_all());
        lock(&p.puts).clear();
        {
            let mut rx = lock(&p.rx);
            rx.partial = None;
            rx.held.clear();
        }
        {
            let mut st = lock(&self.st);
            for xf in st.xfers.values() {
                if let (true, XferKind::GetInit { done, .. }) = (Arc::ptr_eq(&xf.peer, p), &xf.kind)
                {
                    done.complete(Err(err));
                }
            }
            st.backlog.retain(|x| match x {
                Post::Send { peer, .. } => !Arc::ptr_eq(peer, p),
                Post::Recv { .. } => true,
            });
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
        self.ep.cq_signal();
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
        self.teardown();
        lock(&self.inbox).clear();
        self.queued.store(0, Ordering::Release);
    }
}
