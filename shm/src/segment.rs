//! POSIX shared-memory segments with a versioned `#[repr(C)]` header.
//!
//! # Creation protocol (iceoryx2's)
//! The creator `shm_open`s with `O_CREAT | O_EXCL`, mode 0600, sizes the object, maps it,
//! writes every header field and initializes the body, and only then stores the layout
//! version (Release). An opener maps the object, waits (bounded) until the version word is
//! non-zero (Acquire), and rejects a wrong magic, version, kind or size. Nothing inside a
//! segment is a pointer: layouts refer to each other by byte offsets from the segment start.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;

use crate::error::SegmentError;
use crate::name::SegmentName;
use crate::platform::{self, ProcessId};

/// First word of every segment: "DRAGONRS" in little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"DRAGONRS");
/// Version of [`SegmentHeader`]; bodies carry their own versions too.
pub const LAYOUT_VERSION: u32 = 1;
/// Size of the header; bodies start at this offset (cache-line aligned).
pub const HEADER_SIZE: usize = 128;
/// How long an opener waits for a creator that is still initializing, by default.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The header at offset 0 of every segment. All fields are atomics so that readers in other
/// processes never race with plain accesses; all but `version` are written once, before
/// `version` is published.
#[repr(C)]
#[derive(Debug)]
pub struct SegmentHeader {
    /// [`MAGIC`].
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`]; zero while the creator initializes.
    pub version: AtomicU32,
    /// [`SegmentKind`](crate::name::SegmentKind) code.
    pub kind: AtomicU32,
    /// Total size of the object in bytes, header included.
    pub size: AtomicU64,
    /// Creator's OS pid.
    pub creator_pid: AtomicU32,
    /// Node index (also in the name).
    pub node: AtomicU32,
    /// Creator's start time (clock ticks since boot) for pid-reuse-proof liveness.
    pub creator_start: AtomicU64,
    /// Runtime id (also in the name).
    pub runtime_id: AtomicU64,
    /// Segment id (also in the name).
    pub segment_id: AtomicU64,
    reserved: [AtomicU64; 9],
}

const _: () = assert!(std::mem::size_of::<SegmentHeader>() == HEADER_SIZE);

impl SegmentHeader {
    /// The creator's identity.
    pub fn creator(&self) -> ProcessId {
        ProcessId {
            pid: self.creator_pid.load(Ordering::Relaxed),
            start: self.creator_start.load(Ordering::Relaxed),
        }
    }
}

/// A mapped segment. Unlinks its name on drop when it is the creator's handle, unless told
/// otherwise with [`Segment::set_unlink_on_drop`].
#[derive(Debug)]
pub struct Segment {
    name: SegmentName,
    map: MmapRaw,
    writable: bool,
    /// Atomic so that [`Segment::unlink`] works through a shared handle (a pool's segment is
    /// shared by every clone of the pool).
    unlink_on_drop: AtomicBool,
    /// The process that made this handle: a copy inherited through `fork` never unlinks.
    owner_pid: u32,
}

// SAFETY: a Segment is an owned mapping; all access to its memory goes through atomics or
// through layouts that synchronize with atomics, so sharing the handle between threads is
// as safe as sharing it between processes.
unsafe impl Send for Segment {}
// SAFETY: see above.
unsafe impl Sync for Segment {}

fn map_file(file: &File, len: usize, writable: bool) -> Result<MmapRaw, SegmentError> {
    let mut opts = MmapOptions::new();
    opts.len(len);
    let r = if writable {
        opts.map_raw(file)
    } else {
        opts.map_raw_read_only(file)
    };
    r.map_err(|e| SegmentError::Os(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))
}

impl Segment {
    /// Creates a segment of `size` bytes (header included), runs `init` on it while no
    /// opener can use it yet, then publishes it. On any error the name is removed again.
    pub fn create(
        name: &SegmentName,
        size: usize,
        init: impl FnOnce(&Segment) -> Result<(), SegmentError>,
    ) -> Result<Segment, SegmentError> {
        if size < HEADER_SIZE {
            return Err(SegmentError::BadSize);
        }
        let os_name = name.os_name();
        let file = platform::shm_create(&os_name, size as u64)?;
        let seg = match map_file(&file, size, true) {
            Ok(map) => Segment {
                name: *name,
                map,
                writable: true,
                unlink_on_drop: AtomicBool::new(true),
                owner_pid: std::process::id(),
            },
            Err(e) => {
                let _ = platform::shm_remove(&os_name);
                return Err(e);
            }
        };
        let me = ProcessId::current();
        let h = seg.header();
        h.magic.store(MAGIC, Ordering::Relaxed);
        h.kind.store(name.kind as u32, Ordering::Relaxed);
        h.size.store(size as u64, Ordering::Relaxed);
        h.creator_pid.store(me.pid, Ordering::Relaxed);
        h.creator_start.store(me.start, Ordering::Relaxed);
        h.node.store(name.node, Ordering::Relaxed);
        h.runtime_id.store(name.runtime, Ordering::Relaxed);
        h.segment_id.store(name.id, Ordering::Relaxed);
        init(&seg)?; // on error `seg` drops and unlinks
                     // SYNC POINT: publishes header and body; pairs with the Acquire load in `open`.
        h.version.store(LAYOUT_VERSION, Ordering::Release);
        Ok(seg)
    }

    /// Opens an existing segment of the given kind, waiting up to `init_timeout` for its
    /// creator to finish initializing.
    pub fn open(
        name: &SegmentName,
        init_timeout: Duration,
        writable: bool,
    ) -> Result<Segment, SegmentError> {
        let file = platform::shm_open_existing(&name.os_name(), writable)?;
        let deadline = Instant::now() + init_timeout;
        // The creator sizes the object right after creating it; wait for that too.
        let len = loop {
            let len = file
                .metadata()
                .map_err(|_| SegmentError::Os(Errno::EIO))?
                .len() as usize;
            if len >= HEADER_SIZE {
                break len;
            }
            if Instant::now() >= deadline {
                return Err(if len == 0 {
                    SegmentError::InitTimeout
                } else {
                    SegmentError::BadSize
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let _ = file.as_fd();
        let map = map_file(&file, len, writable)?;
        let seg = Segment {
            name: *name,
            map,
            writable,
            unlink_on_drop: AtomicBool::new(false),
            owner_pid: std::process::id(),
        };
        let h = seg.header();
        let mut backoff = Duration::from_micros(50);
        loop {
            // SYNC POINT: pairs with the Release store of `version` in `create`.
            let v = h.version.load(Ordering::Acquire);
            if v != 0 {
                if h.magic.load(Ordering::Relaxed) != MAGIC {
                    return Err(SegmentError::BadMagic);
                }
                if v != LAYOUT_VERSION {
                    return Err(SegmentError::BadVersion {
                        found: v,
                        expected: LAYOUT_VERSION,
                    });
                }
                break;
            }
            let magic = h.magic.load(Ordering::Relaxed);
            if magic != 0 && magic != MAGIC {
                return Err(SegmentError::BadMagic);
            }
            if Instant::now() >= deadline {
                return Err(SegmentError::InitTimeout);
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(5));
        }
        let kind = h.kind.load(Ordering::Relaxed);
        if kind != name.kind as u32 {
            return Err(SegmentError::WrongKind { found: kind });
        }
        if h.size.load(Ordering::Relaxed) != len as u64 {
            return Err(SegmentError::BadSize);
        }
        Ok(seg)
    }

    /// The segment's name.
    pub fn name(&self) -> &SegmentName {
        &self.name
    }

    /// Total mapped length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: a segment holds at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether this mapping may be written.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The header.
    pub fn header(&self) -> &SegmentHeader {
        // SAFETY: the mapping is at least HEADER_SIZE bytes (checked on create and open),
        // page-aligned, and SegmentHeader is all atomics, valid for any bit pattern.
        unsafe { &*(self.map.as_ptr() as *const SegmentHeader) }
    }

    /// Base address of the mapping (valid while `self` lives).
    pub fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Checks that `[offset, offset+len)` lies inside the segment and that `offset` is
    /// aligned to `align`.
    pub fn check_range(&self, offset: usize, len: usize, align: usize) -> Result<(), SegmentError> {
        let end = offset.checked_add(len).ok_or(SegmentError::OutOfBounds)?;
        if end > self.len() || !offset.is_multiple_of(align) {
            return Err(SegmentError::OutOfBounds);
        }
        Ok(())
    }

    /// A shared reference to a `T` at `offset`, bounds- and alignment-checked.
    ///
    /// # Safety
    /// `T` must be valid for any bit pattern another process may have written there (in
    /// practice: `#[repr(C)]` structs of atomics), and the caller must not create a `&mut`
    /// to the same bytes.
    pub unsafe fn at<T>(&self, offset: usize) -> Result<&T, SegmentError> {
        self.check_range(offset, std::mem::size_of::<T>(), std::mem::align_of::<T>())?;
        // SAFETY: in bounds and aligned (checked above); validity is the caller's contract.
        Ok(unsafe { &*(self.base().add(offset) as *const T) })
    }

    /// An atomic word at `offset` (checked), e.g. for raw benchmarks and Value storage.
    pub fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64, SegmentError> {
        // SAFETY: AtomicU64 is valid for every bit pattern.
        unsafe { self.at::<AtomicU64>(offset) }
    }

    /// Whether dropping this handle removes the name.
    pub fn set_unlink_on_drop(&mut self, yes: bool) {
        *self.unlink_on_drop.get_mut() = yes;
    }

    /// Removes the name now (mappings stay valid); this handle no longer removes it on drop,
    /// so a segment made later under the same name is left alone.
    pub fn unlink(&self) -> Result<(), SegmentError> {
        self.unlink_on_drop.store(false, Ordering::Relaxed);
        platform::shm_remove(&self.name.os_name()).map_err(SegmentError::Os)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if *self.unlink_on_drop.get_mut() && std::process::id() == self.owner_pid {
            let _ = platform::shm_remove(&self.name.os_name());
        }
    }
}

/// What an inspector can learn from a segment's header without knowing its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The parsed name.
    pub name: SegmentName,
    /// Size in bytes.
    pub size: u64,
    /// Who created it.
    pub creator: ProcessId,
    /// Layout version found (0: creator still initializing or died doing so).
    pub version: u32,
    /// Whether the creator process still lives.
    pub creator_alive: bool,
}

/// Reads the header of a segment by name, read-only, without waiting for initialization.
pub fn inspect(name: &SegmentName) -> Result<SegmentInfo, SegmentError> {
    let file = platform::shm_open_existing(&name.os_name(), false)?;
    let len = file
        .metadata()
        .map_err(|_| SegmentError::Os(Errno::EIO))?
        .len() as usize;
    if len < HEADER_SIZE {
        return Err(SegmentError::BadSize);
    }
    let map = map_file(&file, HEADER_SIZE, false)?;
    // SAFETY: mapping of HEADER_SIZE bytes, page-aligned; header is all atomics; we only load.
    let h = unsafe { &*(map.as_ptr() as *const SegmentHeader) };
    let magic = h.magic.load(Ordering::Relaxed);
    let version = h.version.load(Ordering::Acquire);
    if magic != MAGIC && !(magic == 0 && version == 0) {
        return Err(SegmentError::BadMagic);
    }
    let creator = h.creator();
    Ok(SegmentInfo {
        name: *name,
        size: len as u64,
        creator,
        version,
        creator_alive: creator.is_alive(),
    })
}

/// Lists the names in `/dev/shm` that parse as ours, plus the entries that start with our
/// prefix but do not parse (returned separately so tools can report them).
pub fn list() -> std::io::Result<(Vec<SegmentName>, Vec<String>)> {
    let mut ours = Vec::new();
    let mut odd = Vec::new();
    for entry in std::fs::read_dir(platform::SHM_DIR)? {
        let entry = entry?;
        let fname = entry.file_name();
        let Some(s) = fname.to_str() else { continue };
        if !s.starts_with(crate::name::PREFIX) {
            continue;
        }
        match SegmentName::parse(s) {
            Ok(n) => ours.push(n),
            Err(_) => odd.push(s.to_string()),
        }
    }
    ours.sort_by_key(|n| (n.runtime, n.node, n.kind as u32, n.id));
    Ok((ours, odd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::SegmentKind;
    use crate::testing::test_runtime;

    #[test]
    fn create_open_and_unlink() {
        let name = SegmentName::new(test_runtime(), 0, SegmentKind::Raw, 1);
        let seg = Segment::create(&name, 4096, |s| {
            s.atomic_u64(HEADER_SIZE)?.store(99, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
        let other = Segment::open(&name, DEFAULT_INIT_TIMEOUT, true).unwrap();
        assert_eq!(
            other
                .atomic_u64(HEADER_SIZE)
                .unwrap()
                .load(Ordering::Relaxed),
            99
        );
        assert_eq!(other.header().creator(), ProcessId::current());
        let info = inspect(&name).unwrap();
        assert!(info.creator_alive);
        assert_eq!(info.size, 4096);
        assert_eq!(
            Segment::create(&name, 4096, |_| Ok(())).unwrap_err(),
            SegmentError::Os(Errno::EEXIST)
        );
        drop(seg);
        assert_eq!(
            Segment::open(&name, DEFAULT_INIT_TIMEOUT, true).unwrap_err(),
            SegmentError::Os(Errno::ENOENT)
        );
        assert!(other.atomic_u64(4096).is_err());
        assert!(other.atomic_u64(HEADER_SIZE + 1).is_err());
    }

    #[test]
    fn rejects_foreign_and_wrong_versions() {
        let rt = test_runtime();
        // A file with our name but garbage inside.
        let name = SegmentName::new(rt, 0, SegmentKind::Raw, 2);
        let f = platform::shm_create(&name.os_name(), 4096).unwrap();
        std::io::Write::write_all(&mut &f, &[0xAB; 256]).unwrap();
        let e = Segment::open(&name, Duration::from_millis(50), true).unwrap_err();
        assert_eq!(e, SegmentError::BadMagic);
        platform::shm_remove(&name.os_name()).unwrap();

        // A real segment whose version we bump.
        let name = SegmentName::new(rt, 0, SegmentKind::Raw, 3);
        let seg = Segment::create(&name, 4096, |_| Ok(())).unwrap();
        seg.header()
            .version
            .store(LAYOUT_VERSION + 7, Ordering::Release);
        let e = Segment::open(&name, Duration::from_millis(50), true).unwrap_err();
        assert!(matches!(e, SegmentError::BadVersion { .. }));
        // A header whose kind disagrees with its name.
        seg.header()
            .version
            .store(LAYOUT_VERSION, Ordering::Release);
        seg.header()
            .kind
            .store(SegmentKind::Pool as u32, Ordering::Relaxed);
        let e = Segment::open(&name, Duration::from_millis(50), true).unwrap_err();
        assert_eq!(
            e,
            SegmentError::WrongKind {
                found: SegmentKind::Pool as u32
            }
        );
        drop(seg);
        assert!(crate::testing::leftovers(rt).is_empty());
    }

    #[test]
    fn opener_waits_for_initializing_creator_then_times_out() {
        let name = SegmentName::new(test_runtime(), 0, SegmentKind::Raw, 4);
        let r = Segment::create(&name, 4096, |_| {
            // While we are "initializing", an opener must time out, not read garbage.
            let e = Segment::open(&name, Duration::from_millis(30), true).unwrap_err();
            assert_eq!(e, SegmentError::InitTimeout);
            Ok(())
        });
        assert!(r.is_ok());
    }

    #[test]
    fn a_handle_inherited_through_fork_never_unlinks() {
        let rt = crate::testing::test_runtime();
        let name = SegmentName::new(rt, 0, SegmentKind::Raw, 1);
        let seg = Segment::create(&name, 4096, |_| Ok(())).unwrap();
        // SAFETY: the child only drops the inherited handle (munmap, getpid) and _exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                drop(seg);
                // SAFETY: _exit never returns and runs no Rust destructors or atexit hooks.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap();
            }
        }
        assert_eq!(
            crate::testing::leftovers(rt),
            vec![name],
            "the child unlinked our segment"
        );
        drop(seg);
        assert!(crate::testing::leftovers(rt).is_empty());
    }
}
