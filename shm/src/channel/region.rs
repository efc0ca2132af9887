//! The channel region by itself, before and beside any [`Channel`](super::Channel) handle: how many bytes
//! it needs ([`region_size`], [`segment_size`]), writing a fresh one (`init_region`),
//! checking one found in memory (`validate`), and reading its figures (`stats_at`,
//! [`stats_of`] on any mapping of a `chan` segment, read-only included).

use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    ChannelError, ChannelHeader, ChannelStats, CHANNEL_MAGIC, CHANNEL_VERSION, CH_OFF, HEAD_OFF,
    INTENTS, INTENT_OFF, MIN_SLOT_SIZE, SLOTS_OFF, SLOT_HDR, TAIL_OFF,
};
use crate::error::SegmentError;
use crate::ring::{Intent, Intents, Ring};
use crate::segment::{Segment, HEADER_SIZE};

/// The bytes a channel region of `capacity` slots of `slot_size` payload bytes needs.
pub fn region_size(capacity: u64, slot_size: usize) -> Option<usize> {
    let stride = stride_of(slot_size.max(MIN_SLOT_SIZE))?;
    usize::try_from(capacity)
        .ok()?
        .checked_mul(stride)?
        .checked_add(SLOTS_OFF)
}

/// The segment size a `chan` segment of `capacity` slots of `slot_size` bytes needs.
pub fn segment_size(capacity: u64, slot_size: usize) -> Option<usize> {
    region_size(capacity, slot_size)?.checked_add(HEADER_SIZE)
}

pub(super) fn stride_of(slot_size: usize) -> Option<usize> {
    let s = slot_size.checked_add(SLOT_HDR)?.checked_add(63)?;
    Some(s / 64 * 64)
}

/// Checks a channel region's header against its length.
///
/// # Safety
/// `base` must point to `len` readable bytes, 64-byte aligned, that stay mapped meanwhile.
pub(super) unsafe fn validate(
    base: *const u8,
    len: usize,
) -> Result<(u64, usize, usize, u64), SegmentError> {
    if len < SLOTS_OFF || !(base as usize).is_multiple_of(64) {
        return Err(SegmentError::BadSize);
    }
    // SAFETY: the header (128 B) lies inside the region (len >= SLOTS_OFF, checked); all
    // atomics, valid for any bits.
    let h = unsafe { &*(base.add(CH_OFF) as *const ChannelHeader) };
    if h.magic.load(Ordering::Relaxed) != CHANNEL_MAGIC {
        return Err(SegmentError::BadMagic);
    }
    let v = h.version.load(Ordering::Relaxed);
    if v != CHANNEL_VERSION {
        return Err(SegmentError::BadVersion {
            found: v,
            expected: CHANNEL_VERSION,
        });
    }
    let cap = h.capacity.load(Ordering::Relaxed);
    let slot_size = h.slot_size.load(Ordering::Relaxed) as usize;
    let stride = h.stride.load(Ordering::Relaxed) as usize;
    if cap == 0
        || slot_size < MIN_SLOT_SIZE
        || stride_of(slot_size) != Some(stride)
        || region_size(cap, slot_size).is_none_or(|need| need > len)
    {
        return Err(SegmentError::Corrupt);
    }
    Ok((cap, slot_size, stride, h.pool_id.load(Ordering::Relaxed)))
}

/// Reads the figures of a validated region.
///
/// # Safety
/// As for [`validate`], and the region must have passed it.
pub(super) unsafe fn stats_at(
    base: *const u8,
    cap: u64,
    slot_size: usize,
    pool_id: u64,
) -> ChannelStats {
    // SAFETY: validated region: the header lies inside; all atomics.
    let h = unsafe { &*(base.add(CH_OFF) as *const ChannelHeader) };
    let stride = stride_of(slot_size).expect("validated");
    // SAFETY: validated region of `cap` slots of `stride` bytes (caller's contract).
    let (ring, intents) = unsafe { (ring_at(base, cap, stride), intents_at(base)) };
    let (tail, head) = ring.cursors();
    ChannelStats {
        capacity: cap,
        depth: tail.saturating_sub(head),
        slot_size: slot_size as u64,
        pool_id,
        closed: h.closed.load(Ordering::Acquire) != 0,
        send_waiters: h.send_wq.waiters(),
        recv_waiters: h.recv_wq.waiters(),
        sent: tail,
        received: head,
        mid_operation: intents.announced() as u32,
        uncommitted_send: ring.stuck_recv(),
        uncommitted_recv: ring.stuck_send(),
    }
}

/// Reads a channel's figures from any mapping of its `chan` segment (read-only is enough).
pub fn stats_of(seg: &Segment) -> Result<ChannelStats, SegmentError> {
    if seg.len() < HEADER_SIZE {
        return Err(SegmentError::BadSize);
    }
    // SAFETY: the mapping holds seg.len() bytes from a page-aligned base.
    let base = unsafe { seg.base().add(HEADER_SIZE) };
    let len = seg.len() - HEADER_SIZE;
    // SAFETY: as above; `validate` checks everything it reads.
    let (cap, slot_size, _, pool_id) = unsafe { validate(base, len)? };
    if segment_size(cap, slot_size) != Some(seg.len()) {
        return Err(SegmentError::BadSize);
    }
    // SAFETY: validated just above.
    Ok(unsafe { stats_at(base, cap, slot_size, pool_id) })
}

/// The ring of the region at `base`: its cursors and its slots' stamps.
///
/// # Safety
/// `base` must point to a region of `cap` slots of `stride` bytes (validated, or being
/// initialized by its only user) that stays mapped for `'a`.
pub(super) unsafe fn ring_at<'a>(
    base: *const u8,
    cap: u64,
    stride: usize,
) -> Ring<'a, impl Fn(usize) -> &'a AtomicU64 + 'a> {
    // SAFETY: HEAD_OFF/TAIL_OFF lie in the region (caller's contract); AtomicU64 is valid
    // for any bits.
    let (head, tail) = unsafe {
        (
            &*(base.add(HEAD_OFF) as *const AtomicU64),
            &*(base.add(TAIL_OFF) as *const AtomicU64),
        )
    };
    Ring::new(head, tail, cap, move |i| {
        // SAFETY: i < cap (the ring only asks for slot indices); the slot array lies in the
        // region; stamps are 64-aligned AtomicU64s.
        unsafe { &*(base.add(SLOTS_OFF + i * stride) as *const AtomicU64) }
    })
}

/// The intent table of the region at `base`.
///
/// # Safety
/// As for [`ring_at`] (the table lies before the slots).
pub(super) unsafe fn intents_at<'a>(base: *const u8) -> Intents<'a> {
    // SAFETY: INTENTS entries of two AtomicU64s at INTENT_OFF, inside the region, 64-aligned;
    // atomics are valid for any bits.
    Intents::new(unsafe {
        std::slice::from_raw_parts(base.add(INTENT_OFF) as *const Intent, INTENTS)
    })
}

/// Initializes a fresh, zeroed region.
///
/// # Safety
/// `base` must point to `region_size(capacity, slot_size)` writable bytes, 64-aligned,
/// which no other party uses yet.
pub(super) unsafe fn init_region(base: *mut u8, capacity: u64, slot_size: usize, pool_id: u64) {
    let stride = stride_of(slot_size).expect("checked by caller");
    // SAFETY: caller's contract: the region is ours and large enough; all atomics.
    // SAFETY: caller's contract: the region is ours and large enough; all atomics.
    let h = unsafe { &*(base.add(CH_OFF) as *const ChannelHeader) };
    h.capacity.store(capacity, Ordering::Relaxed);
    h.slot_size.store(slot_size as u64, Ordering::Relaxed);
    h.stride.store(stride as u64, Ordering::Relaxed);
    h.pool_id.store(pool_id, Ordering::Relaxed);
    h.closed.store(0, Ordering::Relaxed);
    h.wake_epoch.store(0, Ordering::Relaxed);
    // SAFETY: caller's contract: a region of `capacity` slots of `stride` bytes, ours alone.
    unsafe {
        ring_at(base, capacity, stride).init();
        intents_at(base).init();
    }
    h.recovering.store(0, Ordering::Relaxed);
    h.magic.store(CHANNEL_MAGIC, Ordering::Relaxed);
    // Published to other processes by whatever hands them the channel (segment version
    // store, or the BlockRef travelling through a synchronizing channel).
    h.version.store(CHANNEL_VERSION, Ordering::Release);
}

pub(super) fn check_params(capacity: u64, slot_size: usize) -> Result<usize, ChannelError> {
    if capacity == 0 || slot_size > u32::MAX as usize {
        return Err(SegmentError::BadSize.into());
    }
    region_size(capacity, slot_size).ok_or_else(|| SegmentError::BadSize.into())
}
