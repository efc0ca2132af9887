//! Memory the provider touches: the endpoint's own page-aligned slabs (send and receive
//! slots, operation contexts) and the registered regions (pool segment and the two slabs).

use std::io;

use super::sys;
use crate::{Result, TransportError};

/// Page-aligned, zeroed memory owned by the endpoint, freed on drop.
pub(super) struct Slab {
    pub(super) ptr: *mut u8,
    pub(super) layout: std::alloc::Layout,
}

// SAFETY: the slab is plain memory; who writes which part when is governed by the slot
// protocol (a slot belongs either to the provider, between post and completion, or to the
// thread that holds it under the state lock).
unsafe impl Send for Slab {}
// SAFETY: as above.
unsafe impl Sync for Slab {}

impl Slab {
    pub(super) fn new(len: usize) -> Result<Slab> {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096)
            .map_err(|_| TransportError::Protocol("bad slab size"))?;
        // SAFETY: the layout has nonzero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(TransportError::Io(io::ErrorKind::OutOfMemory));
        }
        Ok(Slab { ptr, layout })
    }

    /// Start of byte `off` (callers keep `off` within the slab).
    pub(super) fn at(&self, off: usize) -> *mut u8 {
        debug_assert!(off <= self.layout.size());
        self.ptr.wrapping_add(off)
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// The registered regions; closed (before the endpoint's domain) at teardown.
pub(super) struct Regions {
    pub(super) pool: sys::Mr,
    pub(super) tx: sys::Mr,
    pub(super) rx: sys::Mr,
}
