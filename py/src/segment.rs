//! Segment names and block handles: what a process needs to find an object of another one.
//!
//! A block handle crosses to Python as the tuple `(segment, offset, len, gen)`; objects
//! pickle to "attach" recipes made of a pool name and such a handle.

use dragon_shm::heap::BlockRef;
use dragon_shm::{SegmentKind, SegmentName};
use pyo3::prelude::*;

use crate::errors::{Error, Result};

/// A block handle as Python sees it: `(segment, offset, len, gen)`.
pub(crate) type RefTuple = (u64, u64, u64, u32);

/// A fresh random runtime id (64 bits).
#[pyfunction]
pub(crate) fn random_runtime() -> u64 {
    dragon_shm::platform::random_u64()
}

/// The segment name `/dragon-<rt>-<node>-<kind>-<id>` (kind: "pool", "chan" or "raw").
#[pyfunction]
pub(crate) fn segment_name(runtime: u64, node: u32, kind: &str, id: u64) -> Result<String> {
    let kind = SegmentKind::from_word(kind)
        .ok_or_else(|| Error::value(format!("unknown segment kind {kind:?}")))?;
    Ok(SegmentName::new(runtime, node, kind, id).to_string())
}

/// Names of this runtime's segments still present in /dev/shm.
#[pyfunction]
pub(crate) fn leftovers(runtime: u64) -> Vec<String> {
    dragon_shm::testing::leftovers(runtime)
        .iter()
        .map(|n| n.to_string())
        .collect()
}

/// `(creator_pid, creator_alive)` of our segment `name` (with or without the leading `/`).
#[pyfunction]
pub(crate) fn segment_creator(name: &str) -> Result<(u32, bool)> {
    let n = parse_name(name)?;
    let i = dragon_shm::segment::inspect(&n)?;
    Ok((i.creator.pid, i.creator_alive))
}

pub(crate) fn parse_name(name: &str) -> Result<SegmentName> {
    SegmentName::parse(name)
        .map_err(|_| Error::value(format!("not a Dragon-RS segment name: {name}")))
}

pub(crate) fn ref_tuple(r: BlockRef) -> RefTuple {
    (r.segment, r.offset, r.len, r.gen)
}

pub(crate) fn ref_of(t: RefTuple) -> BlockRef {
    BlockRef {
        segment: t.0,
        offset: t.1,
        len: t.2,
        gen: t.3,
        _pad: 0,
    }
}
