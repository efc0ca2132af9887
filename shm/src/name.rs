//! Segment names: `/dragon-<rt>-<node>-<kind>-<id>`.
//!
//! `<rt>` is the runtime id (64 random bits, 16 hex digits), `<node>` the node index
//! (decimal), `<kind>` a short word (`pool`, `chan`, `raw`), `<id>` a decimal id unique in
//! that runtime and node. Several runtimes and emulated nodes share one `/dev/shm`; the name
//! alone tells whose a segment is, and [`SegmentName::parse`] reads it back.

use std::fmt;

use crate::error::SegmentError;

/// Prefix every name of ours starts with (without the leading slash as listed in /dev/shm).
pub const PREFIX: &str = "dragon-";

/// What a segment holds; stored in its header too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum SegmentKind {
    /// A heap pool (allocator state + blocks).
    Pool = 1,
    /// A channel that owns its own segment.
    Channel = 2,
    /// Raw bytes for tools, tests and benchmarks.
    Raw = 3,
}

impl SegmentKind {
    /// The word used in names.
    pub fn word(self) -> &'static str {
        match self {
            SegmentKind::Pool => "pool",
            SegmentKind::Channel => "chan",
            SegmentKind::Raw => "raw",
        }
    }

    /// Kind from the word used in names.
    pub fn from_word(w: &str) -> Option<Self> {
        match w {
            "pool" => Some(SegmentKind::Pool),
            "chan" => Some(SegmentKind::Channel),
            "raw" => Some(SegmentKind::Raw),
            _ => None,
        }
    }

    /// Kind from the code stored in a header.
    pub fn from_code(c: u32) -> Option<Self> {
        match c {
            1 => Some(SegmentKind::Pool),
            2 => Some(SegmentKind::Channel),
            3 => Some(SegmentKind::Raw),
            _ => None,
        }
    }
}

/// A parsed segment name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SegmentName {
    /// Runtime id (random, 64 bits).
    pub runtime: u64,
    /// Node index within the runtime.
    pub node: u32,
    /// What the segment holds.
    pub kind: SegmentKind,
    /// Id unique within (runtime, node).
    pub id: u64,
}

impl SegmentName {
    /// Builds a name.
    pub fn new(runtime: u64, node: u32, kind: SegmentKind, id: u64) -> Self {
        SegmentName {
            runtime,
            node,
            kind,
            id,
        }
    }

    /// Parses `/dragon-...` or `dragon-...` (as listed in `/dev/shm`).
    pub fn parse(s: &str) -> Result<Self, SegmentError> {
        let s = s.strip_prefix('/').unwrap_or(s);
        let rest = s.strip_prefix(PREFIX).ok_or(SegmentError::BadName)?;
        let mut parts = rest.split('-');
        let (Some(rt), Some(node), Some(kind), Some(id), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(SegmentError::BadName);
        };
        if rt.len() != 16 {
            return Err(SegmentError::BadName);
        }
        let runtime = u64::from_str_radix(rt, 16).map_err(|_| SegmentError::BadName)?;
        let node = node.parse().map_err(|_| SegmentError::BadName)?;
        let kind = SegmentKind::from_word(kind).ok_or(SegmentError::BadName)?;
        let id = id.parse().map_err(|_| SegmentError::BadName)?;
        Ok(SegmentName {
            runtime,
            node,
            kind,
            id,
        })
    }

    /// The name as given to `shm_open` (with the leading slash).
    pub fn os_name(&self) -> String {
        self.to_string()
    }

    /// The file name under `/dev/shm` (no slash).
    pub fn file_name(&self) -> String {
        self.to_string()[1..].to_string()
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "/{PREFIX}{:016x}-{}-{}-{}",
            self.runtime,
            self.node,
            self.kind.word(),
            self.id
        )
    }
}

impl std::str::FromStr for SegmentName {
    type Err = SegmentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let n = SegmentName::new(0x00ab_cdef_0123_4567, 3, SegmentKind::Pool, 42);
        assert_eq!(n.to_string(), "/dragon-00abcdef01234567-3-pool-42");
        assert_eq!(SegmentName::parse(&n.to_string()).unwrap(), n);
        assert_eq!(SegmentName::parse(&n.file_name()).unwrap(), n);
    }

    #[test]
    fn rejects_foreign_names() {
        for bad in [
            "dragon",
            "/dragon-xyz-0-pool-1",
            "/dragon-00abcdef01234567-0-pool",
            "/dragon-00abcdef01234567-0-heap-1",
            "/dragon-00abcdef01234567-0-pool-1-2",
            "/other-00abcdef01234567-0-pool-1",
            "/dragon-00abcdef01234567--pool-1",
        ] {
            assert_eq!(SegmentName::parse(bad), Err(SegmentError::BadName), "{bad}");
        }
    }
}
