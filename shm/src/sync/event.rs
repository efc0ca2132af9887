//! [`Event`]: a flag processes wait on (`multiprocessing.Event`).
//!
//! # Protocol
//! `set`: `flag = 1` (Release), then `WaitQueue::notify_all` (no syscall when nobody waits).
//! `wait`: `WaitQueue::wait_until(flag == 1)` (Acquire load).
//! SYNC POINT: the Release store in `set` pairs with the Acquire load in the waiter's
//! check; the wait queue's Dekker pair makes sure a waiter that missed the flag is woken.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{wait_on, Header, Obj, Shared, SyncError, WaitOpts, EVENT_MAGIC};
use crate::heap::{Block, BlockRef, Pool};
use crate::waitqueue::WaitQueue;

#[repr(C)]
pub(crate) struct EventLayout {
    hdr: Header,
    flag: AtomicU32,
    _pad: AtomicU32,
    wq: WaitQueue,
}

// SAFETY: repr(C), atomics and a WaitQueue only, align 8, header first.
unsafe impl Shared for EventLayout {
    const MAGIC: u32 = EVENT_MAGIC;
    const NOT_THIS: &'static str = "not an Event";
    fn header(&self) -> &Header {
        &self.hdr
    }
}

/// A process-shared event flag.
#[derive(Debug)]
pub struct Event {
    obj: Obj<EventLayout>,
}

impl Event {
    /// Creates a cleared event in a new block of `pool`.
    pub fn create(pool: &Pool) -> Result<Event, SyncError> {
        Ok(Event {
            obj: Obj::create(pool, 0, |_| {})?,
        })
    }

    /// Attaches to an event block (e.g. `pool.block(block_ref)` in another process).
    pub fn attach(block: Block) -> Result<Event, SyncError> {
        Ok(Event {
            obj: Obj::attach(block)?,
        })
    }

    /// Another handle (one more hold by this process).
    pub fn try_clone(&self) -> Result<Event, SyncError> {
        Ok(Event {
            obj: self.obj.try_clone()?,
        })
    }

    /// The handle other processes attach with.
    pub fn block_ref(&self) -> BlockRef {
        self.obj.block_ref()
    }

    /// The block holding the event.
    pub fn block(&self) -> &Block {
        self.obj.block()
    }

    /// Sets the flag and wakes every waiter.
    pub fn set(&self) {
        let l = self.obj.get();
        // SYNC POINT: Release pairs with the Acquire load in `wait_with`.
        l.flag.store(1, Ordering::Release);
        l.wq.notify_all();
    }

    /// Clears the flag.
    pub fn clear(&self) {
        self.obj.get().flag.store(0, Ordering::Release);
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        self.obj.get().flag.load(Ordering::Acquire) != 0
    }

    /// Waits until the flag is set; false when `timeout` passed first.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        self.wait_with(&WaitOpts::timeout(timeout)).is_ok()
    }

    /// Waits until the flag is set: `TimedOut` at the deadline, `Interrupted` on a signal
    /// when `opts.interruptible`.
    pub fn wait_with(&self, opts: &WaitOpts) -> Result<(), SyncError> {
        let l = self.obj.get();
        // SYNC POINT: Acquire pairs with the Release store in `set`.
        wait_on(&l.wq, opts, || {
            (l.flag.load(Ordering::Acquire) != 0).then_some(())
        })
    }
}

// The shared layouts of this file, fixed: a change here changes what other processes (and
// other versions) read, so it must come with a layout version bump. (Loom's atomics differ.)
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<EventLayout>() == 24);

#[cfg(test)]
mod tests {
    use super::super::test_util::{finish, pool, until};
    use super::*;
    use std::sync::Arc;

    #[test]
    fn layout_size() {
        assert_eq!(std::mem::size_of::<EventLayout>(), 24);
    }

    #[test]
    fn wait_times_out_then_set_wakes_threads() {
        let (rt, p) = pool();
        let e = Arc::new(Event::create(&p).unwrap());
        assert!(!e.is_set());
        assert!(!e.wait(Some(Duration::from_millis(10))));
        assert_eq!(
            e.wait_with(&WaitOpts::timeout(Some(Duration::ZERO))),
            Err(SyncError::TimedOut)
        );
        let ts: Vec<_> = (0..3)
            .map(|_| {
                let e = e.clone();
                std::thread::spawn(move || e.wait(Some(Duration::from_secs(30))))
            })
            .collect();
        until(|| e.obj.get().wq.waiters() == 3);
        e.set();
        for t in ts {
            assert!(t.join().unwrap());
        }
        assert!(e.is_set());
        assert!(e.wait(Some(Duration::ZERO)));
        e.clear();
        assert!(!e.is_set());
        assert!(!e.wait(Some(Duration::from_millis(1))));
        drop(e);
        finish(rt, p);
    }

    #[test]
    fn attach_checks_magic_and_shares_state() {
        let (rt, p) = pool();
        let e = Event::create(&p).unwrap();
        // SAFETY: the sync object never lends its block mutably.
        let e2 = Event::attach(unsafe { p.block(e.block_ref()) }.unwrap()).unwrap();
        e2.set();
        assert!(e.is_set());
        let not_event = p.alloc_zeroed(64).unwrap();
        assert_eq!(
            Event::attach(not_event).unwrap_err(),
            SyncError::BadLayout("not an Event")
        );
        let small = p.alloc_zeroed(8).unwrap();
        assert_eq!(
            Event::attach(small).unwrap_err(),
            SyncError::BadLayout("block too small")
        );
        drop((e, e2));
        finish(rt, p);
    }
}
