//! `dragon-shm`: per-node shared memory for Dragon-RS.
//!
//! Layers inside this crate, bottom first:
//! * [`platform`]: `shm_open`/`mmap`, futex, process identity and liveness.
//! * [`name`], [`segment`]: named segments with a versioned `#[repr(C)]` header.
//! * [`waitqueue`], [`lock`]: how everything blocks (futex event count) and the robust
//!   process-shared mutex.
//! * [`heap`]: the pool allocator with refcounted blocks and dead-holder sweeps.
//! * [`ring`], [`channel`]: the bounded MPMC ring (stamp protocol) and channels on it.
//! * [`sync`]: Event, Lock, RLock, Semaphore, BoundedSemaphore, Barrier, Condition and raw
//!   Value/Array storage, all living in pool blocks.
//!
//! [`error`] holds [`SegmentError`] and says where each other error enum lives; [`heap`] and
//! [`channel`] are folders whose `mod.rs` docs map their files.
//!
//! This crate knows nothing of nodes, Python or serialization.

#![warn(missing_docs)]

pub(crate) mod primitive;
pub mod ring;
pub mod waitqueue;

#[cfg(not(loom))]
pub mod channel;
#[cfg(not(loom))]
pub mod error;
#[cfg(not(loom))]
pub(crate) mod fault;
#[cfg(not(loom))]
pub mod heap;
#[cfg(not(loom))]
pub mod kv;
#[cfg(not(loom))]
pub mod lock;
#[cfg(not(loom))]
pub mod name;
#[cfg(not(loom))]
pub mod platform;
#[cfg(not(loom))]
pub mod segment;
#[cfg(not(loom))]
pub mod sync;
#[cfg(not(loom))]
pub mod testing;

#[cfg(loom)]
pub mod platform;

#[cfg(not(loom))]
pub use error::SegmentError;
#[cfg(not(loom))]
pub use name::{SegmentKind, SegmentName};
#[cfg(not(loom))]
pub use segment::Segment;
