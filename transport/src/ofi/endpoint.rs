//! Setting up and tearing down the endpoint: fabric, domain, endpoint, completion queue and
//! address vector (through [`sys`]), the memory registrations, the slabs and the
//! threads ([`OfiTransport::open`]); closing it all in order ([`Inner::teardown`]).

use std::collections::{HashMap, VecDeque};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::mr::{Regions, Slab};
use super::state::{Counted, Inner, State};
use super::{
    available, fi_err, node_for, random_nonzero, sys, OfiTransport, CTX, RMA_SLOTS, RX_SLOTS, SLOT,
    TX_SLOTS,
};
use crate::common::lock;
use crate::{Config, Result, TransportError};

impl OfiTransport {
    /// Opens an endpoint of `provider` (e.g. `tcp;ofi_rxm`, `shm`) and starts listening on
    /// [`Config::listen`] for side-channel connections. Fails with
    /// [`TransportError::Unavailable`] when libfabric or the provider cannot be used (the
    /// reason is logged as a warning).
    pub fn open(cfg: Config, provider: &str) -> Result<OfiTransport> {
        if cfg.queue_depth == 0 || cfg.max_message > u32::MAX as usize {
            return Err(TransportError::Protocol("bad configuration"));
        }
        if let Err(e) = available() {
            tracing::warn!("ofi: {e}");
            return Err(TransportError::Unavailable);
        }
        let node = node_for(provider, &cfg.listen);
        let ep = sys::Ep::open(provider, node.as_deref()).map_err(|e| {
            tracing::warn!(provider, "ofi: {e}");
            TransportError::Unavailable
        })?;
        let my_addr = ep.name().map_err(|e| fi_err("fi_getname", e.into()))?;
        let tx_slab = Slab::new(TX_SLOTS * SLOT)?;
        let rx_slab = Slab::new(RX_SLOTS * SLOT)?;
        let ctxs = Slab::new((RX_SLOTS + TX_SLOTS + RMA_SLOTS) * CTX)?;
        let seg = cfg.pool.segment();
        let pool_ptr = seg.base();
        let pool_len = seg.len();
        let key_mask = if ep.attrs.mr_key_size >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * ep.attrs.mr_key_size.max(1))) - 1
        };
        let reg = |ptr: *mut u8, len: usize, access: u64| -> Result<sys::Mr> {
            let mut last = 0;
            for _ in 0..8 {
                let key = random_nonzero() & key_mask;
                // SAFETY: the memory (the pool mapping or a slab) stays mapped for the
                // endpoint's life: the pool handle and the slabs are owned by Inner, and the
                // regions are closed in teardown, before either goes away and before the
                // domain closes (or right below when opening fails).
                match unsafe { ep.mr_reg(ptr, len, access, key) } {
                    Ok(m) => return Ok(m),
                    Err(e) if -e == sys::FI_ENOKEY => last = e,
                    Err(e) => return Err(fi_err("fi_mr_reg", e.into())),
                }
            }
            Err(fi_err("fi_mr_reg", last.into()))
        };
        let mut regs: Vec<sys::Mr> = Vec::new();
        let listener = (|| -> Result<TcpListener> {
            regs.push(reg(pool_ptr, pool_len, sys::FI_READ | sys::FI_REMOTE_READ)?);
            regs.push(reg(tx_slab.ptr, TX_SLOTS * SLOT, sys::FI_SEND)?);
            regs.push(reg(rx_slab.ptr, RX_SLOTS * SLOT, sys::FI_RECV)?);
            Ok(TcpListener::bind(&cfg.listen)?)
        })();
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                for m in regs {
                    m.close();
                }
                return Err(e);
            }
        };
        let addr = listener.local_addr()?;
        let rx_mr = regs.pop();
        let tx_mr = regs.pop();
        let pool_mr = regs.pop();
        let (Some(pool_mr), Some(tx_mr), Some(rx_mr)) = (pool_mr, tx_mr, rx_mr) else {
            return Err(TransportError::Protocol("memory registration"));
        };
        let pool_base = if ep.attrs.mr_mode & sys::FI_MR_VIRT_ADDR != 0 {
            pool_ptr as u64
        } else {
            0
        };
        let inflight = Arc::new(AtomicI64::new(0));
        let inner = Arc::new(Inner {
            pool_desc: pool_mr.desc as usize,
            tx_desc: tx_mr.desc as usize,
            rx_desc: rx_mr.desc as usize,
            pool_key: pool_mr.key,
            regions: Mutex::new(Some(Regions {
                pool: pool_mr,
                tx: tx_mr,
                rx: rx_mr,
            })),
            cfg,
            ep,
            st: Mutex::new(State {
                dead: false,
                backlog: VecDeque::new(),
                free_tx: (0..TX_SLOTS).rev().collect(),
                tx_peer: (0..TX_SLOTS).map(|_| None).collect(),
                free_rma: (0..RMA_SLOTS).rev().collect(),
                rma: vec![None; RMA_SLOTS],
                xfers: Counted::new(&inflight),
                rma_wait: VecDeque::new(),
                next_xfer: 1,
                actions: Vec::new(),
            }),
            pool_ptr: pool_ptr as usize,
            pool_len: pool_len as u64,
            pool_base,
            tx_slab,
            rx_slab,
            ctxs,
            my_addr,
            listener,
            addr,
            closed: AtomicBool::new(false),
            torn_down: AtomicBool::new(false),
            peers: Mutex::new(HashMap::new()),
            peers_cv: Condvar::new(),
            tokens: Mutex::new(HashMap::new()),
            joining: Mutex::new(std::collections::HashSet::new()),
            inbox: Mutex::new(VecDeque::new()),
            inbox_cv: Condvar::new(),
            queued: AtomicU64::new(0),
            next_op: AtomicU64::new(1),
            threads: Mutex::new(Vec::new()),
            handshaking: Mutex::new(HashMap::new()),
            next_hs: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            last_post: AtomicU64::new(0),
            last_cq: AtomicU64::new(0),
            last_event: AtomicU64::new(0),
            epoch: Instant::now(),
            poll_lock: Mutex::new(()),
            app_polling: AtomicU64::new(0),
            gate: Mutex::new(()),
            gate_cv: Condvar::new(),
            gate_waiting: AtomicBool::new(false),
            inflight,
            cq_warned: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            backlogged: AtomicBool::new(false),
        });
        {
            let mut st = lock(&inner.st);
            for slot in 0..RX_SLOTS {
                inner.post_recv(&mut st, slot);
            }
        }
        let t = OfiTransport { inner };
        t.inner.spawn("dt-ofi-progress", |me| me.progress_loop());
        t.inner.spawn("dt-ofi-listen", |me| me.listen_loop());
        Ok(t)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl Inner {
    /// Closes the endpoint and the regions. Afterwards the provider touches none of our
    /// memory, so held blocks and slabs may go.
    pub(super) fn teardown(&self) {
        // Readers of the CQ hold poll_lock: none is inside libfabric after this.
        let _p = lock(&self.poll_lock);
        if self.torn_down.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut st = lock(&self.st);
        st.dead = true;
        self.ep.close_ep();
        drop(st.xfers.take_all());
        st.backlog.clear();
        st.actions.clear();
        st.rma_wait.clear();
        for t in st.tx_peer.iter_mut() {
            *t = None;
        }
        drop(st);
        if let Some(r) = lock(&self.regions).take() {
            r.pool.close();
            r.tx.close();
            r.rx.close();
        }
    }
}
