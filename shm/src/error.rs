//! Small, `Copy` error enums, one per family of operations (iceoryx2 style). No strings
//! inside; `Display` (derived with `thiserror`) says what happened in words.
//!
//! [`SegmentError`] lives here because every layer opens segments; the other enums live
//! beside their operations: [`AllocError`](crate::heap::AllocError),
//! [`ChannelError`](crate::channel::ChannelError), [`SyncError`](crate::sync::SyncError),
//! [`KvError`](crate::kv::KvError), [`LockError`](crate::lock::LockError),
//! [`WaitError`](crate::waitqueue::WaitError) and [`RingError`](crate::ring::RingError).
//! An enum that wraps another shows the inner one's text unchanged.

use nix::errno::Errno;

/// Errors opening, creating or reading a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    /// The OS refused (the errno says why; `EEXIST` on create, `ENOENT` on open...).
    #[error("OS error: {}", .0.desc())]
    Os(Errno),
    /// The name does not follow `/dragon-<rt>-<node>-<kind>-<id>`.
    #[error("not a Dragon-RS segment name")]
    BadName,
    /// The first word is not our magic number: not a Dragon-RS segment.
    #[error("bad magic number: not a Dragon-RS segment")]
    BadMagic,
    /// The layout version is not the one this build understands.
    #[error("segment layout version {found} is not the version {expected} this build reads")]
    BadVersion {
        /// Version word found in the segment.
        found: u32,
        /// Version this build expects.
        expected: u32,
    },
    /// The segment holds another kind of object than asked for.
    #[error("segment holds kind {found}")]
    WrongKind {
        /// Kind code found in the header.
        found: u32,
    },
    /// The size in the header disagrees with the object's size, or is too small.
    #[error("segment size disagrees with its header")]
    BadSize,
    /// The creator did not finish initializing within the timeout.
    #[error("segment creator did not finish initializing")]
    InitTimeout,
    /// An offset or length points outside the segment or is misaligned.
    #[error("offset or length outside the segment")]
    OutOfBounds,
    /// A layout inside the segment (pool, channel) failed its own consistency check.
    #[error("segment contents failed a consistency check")]
    Corrupt,
}

impl From<Errno> for SegmentError {
    fn from(e: Errno) -> Self {
        SegmentError::Os(e)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;
    use crate::channel::ChannelError;
    use crate::heap::AllocError;
    use crate::kv::KvError;
    use crate::sync::SyncError;

    #[test]
    fn display_words_and_wrapping() {
        assert_eq!(
            SegmentError::Os(Errno::ENOENT).to_string(),
            format!("OS error: {}", Errno::ENOENT.desc())
        );
        let v = SegmentError::BadVersion {
            found: 1,
            expected: 2,
        };
        assert_eq!(
            v.to_string(),
            "segment layout version 1 is not the version 2 this build reads"
        );
        // A wrapped error shows the inner one's text unchanged; only SyncError also names it
        // as its source.
        let inner = SegmentError::Corrupt;
        assert_eq!(AllocError::from(inner).to_string(), inner.to_string());
        assert!(AllocError::from(inner).source().is_none());
        assert_eq!(ChannelError::from(inner).to_string(), inner.to_string());
        let full = AllocError::Full;
        assert_eq!(full.to_string(), "pool is full");
        assert_eq!(ChannelError::Alloc(full).to_string(), "pool is full");
        assert!(ChannelError::Alloc(full).source().is_none());
        assert_eq!(
            KvError::Alloc(AllocError::BadRef).to_string(),
            AllocError::BadRef.to_string()
        );
        assert_eq!(SyncError::Alloc(full).to_string(), "pool is full");
        assert_eq!(
            SyncError::Alloc(full).source().map(|e| e.to_string()),
            Some("pool is full".into())
        );
        assert_eq!(
            SyncError::BadLayout("magic").to_string(),
            "bad sync object block: magic"
        );
    }
}
