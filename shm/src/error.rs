//! Small, `Copy` error enums, one per family of operations (iceoryx2 style). No strings
//! inside; `Display` says what happened in words.

use nix::errno::Errno;
use std::fmt;

/// Errors opening, creating or reading a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentError {
    /// The OS refused (the errno says why; `EEXIST` on create, `ENOENT` on open...).
    Os(Errno),
    /// The name does not follow `/dragon-<rt>-<node>-<kind>-<id>`.
    BadName,
    /// The first word is not our magic number: not a Dragon-RS segment.
    BadMagic,
    /// The layout version is not the one this build understands.
    BadVersion {
        /// Version word found in the segment.
        found: u32,
        /// Version this build expects.
        expected: u32,
    },
    /// The segment holds another kind of object than asked for.
    WrongKind {
        /// Kind code found in the header.
        found: u32,
    },
    /// The size in the header disagrees with the object's size, or is too small.
    BadSize,
    /// The creator did not finish initializing within the timeout.
    InitTimeout,
    /// An offset or length points outside the segment or is misaligned.
    OutOfBounds,
    /// A layout inside the segment (pool, channel) failed its own consistency check.
    Corrupt,
}

impl fmt::Display for SegmentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SegmentError::Os(e) => write!(f, "OS error: {}", e.desc()),
            SegmentError::BadName => f.write_str("not a Dragon-RS segment name"),
            SegmentError::BadMagic => f.write_str("bad magic number: not a Dragon-RS segment"),
            SegmentError::BadVersion { found, expected } => write!(
                f,
                "segment layout version {found} is not the version {expected} this build reads"
            ),
            SegmentError::WrongKind { found } => write!(f, "segment holds kind {found}"),
            SegmentError::BadSize => f.write_str("segment size disagrees with its header"),
            SegmentError::InitTimeout => f.write_str("segment creator did not finish initializing"),
            SegmentError::OutOfBounds => f.write_str("offset or length outside the segment"),
            SegmentError::Corrupt => f.write_str("segment contents failed a consistency check"),
        }
    }
}

impl std::error::Error for SegmentError {}

impl From<Errno> for SegmentError {
    fn from(e: Errno) -> Self {
        SegmentError::Os(e)
    }
}
