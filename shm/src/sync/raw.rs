//! [`RawArray`]: zero-initialized shared bytes for `multiprocessing.Value` / `Array`
//! (`sharedctypes`). Python builds ctypes objects over [`RawArray::as_ptr`]; the
//! synchronized variants pair it with a [`super::Lock`] or [`super::RLock`].
//!
//! # Layout
//! 64-byte header (magic, version, `len: u64`, padding), then `len` data bytes, 64-byte
//! aligned. No protocol: whoever uses the bytes decides who writes when.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use super::{Header, Obj, Shared, SyncError, RAW_ARRAY_MAGIC};
use crate::heap::{Block, BlockRef, Pool};

const DATA_OFF: usize = 64;

#[repr(C)]
pub(crate) struct RawLayout {
    hdr: Header,
    len: AtomicU64,
    _pad: [AtomicU64; 6],
}

// SAFETY: repr(C), atomics only, align 8, header first.
unsafe impl Shared for RawLayout {
    const MAGIC: u32 = RAW_ARRAY_MAGIC;
    const NOT_THIS: &'static str = "not a RawArray";
    fn header(&self) -> &Header {
        &self.hdr
    }
}

/// Zero-initialized bytes in a pool block, shared by every process that attaches.
#[derive(Debug)]
pub struct RawArray {
    obj: Obj<RawLayout>,
    len: usize,
}

impl RawArray {
    /// Creates `nbytes` zeroed bytes (64-byte aligned) in a new block of `pool`.
    pub fn create(pool: &Pool, nbytes: usize) -> Result<RawArray, SyncError> {
        let obj = Obj::create(pool, nbytes, |l: &RawLayout| {
            l.len.store(nbytes as u64, Ordering::Relaxed);
        })?;
        Ok(RawArray { obj, len: nbytes })
    }

    /// Attaches to a raw array block (e.g. `pool.block(block_ref)` in another process).
    pub fn attach(block: Block) -> Result<RawArray, SyncError> {
        let obj: Obj<RawLayout> = Obj::attach(block)?;
        let len = obj.get().len.load(Ordering::Relaxed);
        let room = (obj.block().len() - DATA_OFF) as u64;
        if len > room {
            return Err(SyncError::BadLayout("raw array length exceeds its block"));
        }
        Ok(RawArray {
            obj,
            len: len as usize,
        })
    }

    /// Another handle (one more hold by this process).
    pub fn try_clone(&self) -> Result<RawArray, SyncError> {
        Ok(RawArray {
            obj: self.obj.try_clone()?,
            len: self.len,
        })
    }

    /// The handle other processes attach with.
    pub fn block_ref(&self) -> BlockRef {
        self.obj.block_ref()
    }

    /// The block holding the array (header included).
    pub fn block(&self) -> &Block {
        self.obj.block()
    }

    /// Start of the data: 64-byte aligned, `len()` bytes, valid while `self` lives. Other
    /// processes may write it concurrently; callers synchronize (e.g. with a [`super::Lock`]).
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: the block holds at least DATA_OFF + len bytes (checked at create/attach),
        // so the offset stays inside it.
        unsafe { self.obj.block().as_ptr().add(DATA_OFF) }
    }

    /// Number of data bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-byte array.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn byte(&self, i: usize) -> &AtomicU8 {
        assert!(
            i < self.len,
            "index {i} out of range for raw array of {} bytes",
            self.len
        );
        // SAFETY: i < len, so the byte lies inside the block, which lives as long as the
        // returned borrow of self; AtomicU8 has alignment 1 and accepts any value, and all
        // access through it is atomic.
        unsafe { &*(self.as_ptr().add(i) as *const AtomicU8) }
    }

    /// Copies `buf.len()` bytes starting at `off` into `buf` (byte-wise relaxed atomic loads,
    /// so a racing writer cannot cause undefined behaviour).
    ///
    /// # Panics
    /// When `off + buf.len()` exceeds `len()`.
    pub fn read_at(&self, off: usize, buf: &mut [u8]) {
        assert!(
            off.checked_add(buf.len()).is_some_and(|e| e <= self.len),
            "range out of bounds"
        );
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.byte(off + i).load(Ordering::Relaxed);
        }
    }

    /// Copies `data` to the bytes starting at `off` (byte-wise relaxed atomic stores).
    ///
    /// # Panics
    /// When `off + data.len()` exceeds `len()`.
    pub fn write_at(&self, off: usize, data: &[u8]) {
        assert!(
            off.checked_add(data.len()).is_some_and(|e| e <= self.len),
            "range out of bounds"
        );
        for (i, b) in data.iter().enumerate() {
            self.byte(off + i).store(*b, Ordering::Relaxed);
        }
    }

    /// The `i`-th aligned 8-byte word of the data as an atomic (counters, flags).
    ///
    /// # Panics
    /// When `8 * (i + 1)` exceeds `len()`.
    pub fn atomic_u64(&self, i: usize) -> &AtomicU64 {
        let end = i.checked_add(1).and_then(|n| n.checked_mul(8));
        assert!(end.is_some_and(|e| e <= self.len), "word {i} out of range");
        // SAFETY: the word lies inside the data (checked above), which starts 64-byte
        // aligned, so it is 8-byte aligned; any bit pattern is a valid AtomicU64 and all
        // access through it is atomic; the borrow keeps the block alive.
        unsafe { &*(self.as_ptr().add(8 * i) as *const AtomicU64) }
    }
}

// The shared layouts of this file, fixed: a change here changes what other processes (and
// other versions) read, so it must come with a layout version bump. (Loom's atomics differ.)
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<RawLayout>() == 64);

#[cfg(test)]
mod tests {
    use super::super::test_util::{finish, pool};
    use super::*;

    #[test]
    fn zeroed_shared_and_bounds_checked() {
        let (rt, p) = pool();
        // Dirty a block first so zeroing is really tested.
        let mut junk = p.alloc(4096).unwrap();
        junk.as_mut_slice().fill(0xa5);
        drop(junk);
        let a = RawArray::create(&p, 1000).unwrap();
        assert_eq!(a.len(), 1000);
        assert_eq!(a.as_ptr() as usize % 64, 0);
        let mut buf = vec![1u8; 1000];
        a.read_at(0, &mut buf);
        assert!(buf.iter().all(|&b| b == 0));
        a.write_at(990, b"0123456789");
        a.atomic_u64(3).fetch_add(7, Ordering::Relaxed);
        // SAFETY: the sync object never lends its block mutably.
        let b = RawArray::attach(unsafe { p.block(a.block_ref()) }.unwrap()).unwrap();
        assert_eq!(b.len(), 1000);
        let mut tail = [0u8; 10];
        b.read_at(990, &mut tail);
        assert_eq!(&tail, b"0123456789");
        assert_eq!(b.atomic_u64(3).load(Ordering::Relaxed), 7);
        assert!(std::panic::catch_unwind(|| b.read_at(995, &mut [0u8; 10])).is_err());
        assert!(std::panic::catch_unwind(|| b.atomic_u64(125)).is_err());
        let empty = RawArray::create(&p, 0).unwrap();
        assert!(empty.is_empty());
        drop((a, b, empty));
        finish(rt, p);
    }
}
