//! The progress thread and the other readers of the completion queue: polling under one lock,
//! a receiving application polling for a while itself ([`AppPoll`]), heartbeats.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::peer::Peer;
use super::state::Inner;
use super::{side, sys, BUSY_SPIN, PROGRESS_SPIN};
use crate::common::lock;
use crate::Completion;

/// See [`Inner::app_poll`].
pub(super) struct AppPoll<'a>(&'a Inner);

impl Drop for AppPoll<'_> {
    fn drop(&mut self) {
        if self.0.app_polling.fetch_sub(1, Ordering::AcqRel) == 1
            && self.0.gate_waiting.load(Ordering::SeqCst)
        {
            drop(lock(&self.0.gate));
            self.0.gate_cv.notify_one();
        }
    }
}

impl Inner {
    /// Reads and handles the completions waiting now (at most `buf.len()`, plus one error
    /// completion). The caller holds `poll_lock`, so completions are handled in CQ order.
    pub(super) fn poll_once(&self, buf: &mut [sys::Cqe]) -> usize {
        if self.torn_down.load(Ordering::Acquire) {
            return 0;
        }
        let n = self.ep.cq_read(buf);
        if n > 0 {
            self.last_cq
                .store(self.epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
            for e in &buf[..n as usize] {
                self.on_cqe(e);
            }
            return n as usize;
        }
        if n == -sys::FI_EAVAIL {
            if let Some(e) = self.ep.cq_readerr() {
                self.on_cq_err(&e);
            }
            return 1;
        }
        if n < 0 && !self.cq_warned.swap(true, Ordering::Relaxed) {
            tracing::error!("ofi: fi_cq_read: {}", sys::strerror(n as i64));
        }
        0
    }

    /// Marks this thread as polling the CQ from the application side (the progress thread
    /// stays out of the way) until the guard drops.
    pub(super) fn app_poll(&self) -> AppPoll<'_> {
        self.app_polling.fetch_add(1, Ordering::AcqRel);
        AppPoll(self)
    }

    /// A completion whose `wait` polls the CQ itself for a while before it parks.
    pub(super) fn completion(self: &Arc<Self>) -> Completion {
        let w = Arc::downgrade(self);
        Completion::with_poller(Arc::new(move || match w.upgrade() {
            Some(i) if !i.closed.load(Ordering::Acquire) => {
                let _p = i.app_poll();
                i.try_poll()
            }
            _ => 0,
        }))
    }

    /// Polls the CQ if no other thread does (for threads waiting for an event).
    pub(super) fn try_poll(&self) -> usize {
        match self.poll_lock.try_lock() {
            Ok(_g) => {
                let mut buf = [sys::Cqe::default(); 16];
                let n = self.poll_once(&mut buf);
                // The progress thread stays away while we poll: retry refused posts too.
                if self.backlogged.load(Ordering::SeqCst) && !self.torn_down.load(Ordering::Acquire)
                {
                    self.drain_backlog();
                }
                n
            }
            Err(_) => 0,
        }
    }

    /// The progress thread: reads the CQ (the tcp and shm providers move RMA data only while
    /// the target reads its CQ), retries refused posts, sends heartbeats. When idle it
    /// blocks in `poll()` on the CQ's wait descriptor, or (providers without one) sleeps in
    /// steps that grow with idleness, up to 1 ms.
    pub(super) fn progress_loop(self: Arc<Self>) {
        let mut buf = [sys::Cqe::default(); 32];
        let hb = self.cfg.heartbeat.max(Duration::from_millis(1));
        let mut next_hb = Instant::now() + hb;
        while !self.closed.load(Ordering::Acquire) {
            // A thread waiting in recv() is reading the CQ: leave it the CPU and the lock.
            let n = if self.app_polling.load(Ordering::Acquire) > 0 {
                let g = lock(&self.gate);
                self.gate_waiting.store(true, Ordering::SeqCst);
                if self.app_polling.load(Ordering::SeqCst) > 0 {
                    let _ = self.gate_cv.wait_timeout(g, Duration::from_millis(5));
                }
                self.gate_waiting.store(false, Ordering::SeqCst);
                0
            } else {
                let _g = lock(&self.poll_lock);
                self.poll_once(&mut buf)
            };
            if self.backlogged.load(Ordering::SeqCst) {
                // Under poll_lock: transfers it starts may finish here, and their events must
                // not race with those of completion handlers.
                let _g = lock(&self.poll_lock);
                self.drain_backlog();
            }
            let now = Instant::now();
            if now >= next_hb {
                self.heartbeats();
                next_hb = now + hb;
            }
            if n > 0 || self.backlogged.load(Ordering::SeqCst) {
                continue;
            }
            // Completions handled by any thread count as activity.
            let idle = Duration::from_micros(
                (self.epoch.elapsed().as_micros() as u64)
                    .saturating_sub(self.last_cq.load(Ordering::Relaxed)),
            );
            let busy = self.inflight.load(Ordering::Acquire) > 0 && {
                let posted = self.last_post.load(Ordering::Relaxed);
                let since_post = (self.epoch.elapsed().as_micros() as u64).saturating_sub(posted);
                idle.min(Duration::from_micros(since_post)) < BUSY_SPIN
            };
            if idle < PROGRESS_SPIN || busy {
                std::thread::yield_now();
                continue;
            }
            match self.ep.attrs.wait_fd {
                Some(fd) => {
                    if !self.ep.trywait() {
                        continue;
                    }
                    let ms = next_hb
                        .saturating_duration_since(now)
                        .as_millis()
                        .clamp(1, 100) as i32;
                    self.sleeping.store(true, Ordering::SeqCst);
                    // A waker that saw `sleeping` false did not signal: look again first.
                    if !self.backlogged.load(Ordering::SeqCst)
                        && !self.closed.load(Ordering::SeqCst)
                    {
                        let mut p = libc::pollfd {
                            fd,
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: `p` is one valid pollfd; the descriptor belongs to the CQ,
                        // which stays open until teardown, after this thread has ended.
                        unsafe { libc::poll(&mut p, 1, ms) };
                    }
                    self.sleeping.store(false, Ordering::SeqCst);
                }
                None => {
                    let us = (idle.as_micros() / 20).clamp(10, 1000) as u64;
                    std::thread::sleep(Duration::from_micros(us));
                }
            }
        }
    }

    pub(super) fn heartbeats(&self) {
        let ps: Vec<Arc<Peer>> = lock(&self.peers)
            .values()
            .filter(|p| !p.lost.load(Ordering::Acquire))
            .cloned()
            .collect();
        let h = side::header(side::HEARTBEAT, 0);
        for p in ps {
            // SAFETY: the descriptor belongs to `p.side`, open while we hold the Arc; the
            // buffer has h.len() readable bytes. MSG_DONTWAIT: never blocks the progress
            // thread (a peer that does not drain its socket is lost by its own timeout).
            unsafe {
                libc::send(
                    p.side.as_raw_fd(),
                    h.as_ptr().cast(),
                    h.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
        }
    }
}
