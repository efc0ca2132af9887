//! Making a [`Channel`] handle: in a `chan` segment of its own ([`Channel::create`],
//! [`Channel::open`]) or in a block of a pool ([`Channel::create_in`], [`Channel::attach`]).
//! The creator's handle is the one that destroys the channel on drop.

use std::sync::OnceLock;

use super::region::{check_params, init_region, segment_size, stats_of, stride_of, validate};
use super::{Channel, ChannelError, Home, MIN_SLOT_SIZE};
use crate::error::SegmentError;
use crate::heap::{Block, Pool};
use crate::name::{SegmentKind, SegmentName};
use crate::segment::{Segment, DEFAULT_INIT_TIMEOUT, HEADER_SIZE};

impl Channel {
    /// Creates a channel of `capacity` slots with `slot_size` inline payload bytes each
    /// (at least [`MIN_SLOT_SIZE`]); larger messages go through `pool`, which must live on
    /// the same node and runtime. The creator's handle destroys the channel on drop.
    pub fn create(
        name: &SegmentName,
        capacity: u64,
        slot_size: usize,
        pool: Option<Pool>,
    ) -> Result<Channel, ChannelError> {
        if name.kind != SegmentKind::Channel {
            return Err(SegmentError::WrongKind {
                found: name.kind as u32,
            }
            .into());
        }
        let slot_size = slot_size.max(MIN_SLOT_SIZE);
        let stride = stride_of(slot_size).ok_or(SegmentError::BadSize)?;
        check_params(capacity, slot_size)?;
        let size = segment_size(capacity, slot_size).ok_or(SegmentError::BadSize)?;
        let pool_id = pool.as_ref().map_or(0, |p| p.id());
        if let Some(p) = &pool {
            let pn = p.name();
            if pn.runtime != name.runtime || pn.node != name.node {
                return Err(SegmentError::BadName.into());
            }
        }
        let seg = Segment::create(name, size, |seg| {
            seg.check_range(HEADER_SIZE, size - HEADER_SIZE, 64)?;
            // SAFETY: the region after the header is ours (fresh segment, checked range).
            unsafe { init_region(seg.base().add(HEADER_SIZE), capacity, slot_size, pool_id) };
            Ok(())
        })?;
        // SAFETY: the segment is at least HEADER_SIZE long.
        let base = unsafe { seg.base().add(HEADER_SIZE) };
        let ch = Channel {
            home: Home::Segment(seg),
            base,
            cap: capacity,
            slot_size,
            stride,
            pool_id,
            pool: OnceLock::new(),
            destroy_on_drop: true,
            owner_pid: std::process::id(),
            stuck: Default::default(),
        };
        if let Some(p) = pool {
            let _ = ch.pool.set(p);
        }
        Ok(ch)
    }

    /// Opens an existing channel. Its pool (if any) is `pool` when given and matching,
    /// otherwise opened by name on first use.
    pub fn open(name: &SegmentName, pool: Option<Pool>) -> Result<Channel, ChannelError> {
        let seg = Segment::open(name, DEFAULT_INIT_TIMEOUT, true)?;
        stats_of(&seg)?; // validates header and size
                         // SAFETY: validated by stats_of: the region after the header is a channel.
        let base = unsafe { seg.base().add(HEADER_SIZE) };
        // SAFETY: as above.
        let (cap, slot_size, stride, pool_id) = unsafe { validate(base, seg.len() - HEADER_SIZE)? };
        let ch = Channel {
            home: Home::Segment(seg),
            base,
            cap,
            slot_size,
            stride,
            pool_id,
            pool: OnceLock::new(),
            destroy_on_drop: false,
            owner_pid: std::process::id(),
            stuck: Default::default(),
        };
        if let Some(p) = pool.filter(|p| p.id() == pool_id && pool_id != 0) {
            let _ = ch.pool.set(p);
        }
        Ok(ch)
    }

    /// Creates a channel in a block of `pool` (large messages use the same pool). Others
    /// attach with [`Channel::attach`] on `pool.block(ch.block_ref().unwrap())`. The creator's
    /// handle closes and drains the channel on drop; the block goes with its last hold.
    pub fn create_in(
        pool: &Pool,
        capacity: u64,
        slot_size: usize,
    ) -> Result<Channel, ChannelError> {
        let slot_size = slot_size.max(MIN_SLOT_SIZE);
        let size = check_params(capacity, slot_size)?;
        let block = pool.alloc_zeroed(size)?;
        // SAFETY: a fresh zeroed block of `size` bytes, 64-aligned, not yet shared.
        unsafe { init_region(block.as_ptr(), capacity, slot_size, pool.id()) };
        Self::from_block(block, true)
    }

    /// Attaches to a channel living in `block` (a hold taken with [`Pool::block`]).
    pub fn attach(block: Block) -> Result<Channel, ChannelError> {
        Self::from_block(block, false)
    }

    fn from_block(block: Block, destroy_on_drop: bool) -> Result<Channel, ChannelError> {
        let base = block.as_ptr();
        // SAFETY: the block's bytes stay valid while we hold it; 64-aligned.
        let (cap, slot_size, stride, pool_id) = unsafe { validate(base, block.len())? };
        if pool_id != block.pool().id() {
            return Err(SegmentError::Corrupt.into());
        }
        let pool = block.pool().clone();
        let ch = Channel {
            home: Home::Block(block),
            base,
            cap,
            slot_size,
            stride,
            pool_id,
            pool: OnceLock::new(),
            destroy_on_drop,
            owner_pid: std::process::id(),
            stuck: Default::default(),
        };
        let _ = ch.pool.set(pool);
        Ok(ch)
    }
}
