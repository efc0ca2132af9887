//! The libfabric binding: the C shim's functions (`csrc/ofi_shim.c`), run-time loading of
//! libfabric, and a thin [`Ep`] wrapper that owns one RDM endpoint with its fabric, domain,
//! completion queue and address vector.
//!
//! Built with `cfg(dragon_ofi)` (build.rs found the libfabric headers) the functions are the
//! shim's; without it they are stand-ins that fail with `FI_ENOSYS`, so the crate compiles
//! and runs everywhere and [`load`] explains why the back end is unavailable.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

/// `-FI_EAGAIN`: the operation must be retried after progress.
pub const FI_EAGAIN: isize = 11;
/// An error completion waits (`cq_readerr`).
pub const FI_EAVAIL: isize = 259;
/// The operation was cancelled (endpoint closed).
pub const FI_ECANCELED: i32 = 125;
/// The requested key is taken.
pub const FI_ENOKEY: i32 = 266;

/// Local buffer is the target of an outbound RMA read.
pub const FI_READ: u64 = 1 << 8;
/// Local buffer receives messages.
pub const FI_RECV: u64 = 1 << 10;
/// Local buffer sends messages.
pub const FI_SEND: u64 = 1 << 11;
/// Local buffer is the source of a peer's RMA read.
pub const FI_REMOTE_READ: u64 = 1 << 12;
/// Remote addresses are virtual addresses (else offsets into the region).
pub const FI_MR_VIRT_ADDR: u64 = 1 << 4;

/// Opaque `struct dshim_ep`.
#[repr(C)]
pub struct RawEp {
    _p: [u8; 0],
}

/// Opaque `struct fid_mr`.
#[repr(C)]
pub struct RawMr {
    _p: [u8; 0],
}

/// `struct dshim_attrs`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawAttrs {
    prov: [c_char; 64],
    fabric: [c_char; 64],
    mr_mode: u64,
    inject_size: u64,
    max_msg_size: u64,
    tx_size: u64,
    rx_size: u64,
    mr_key_size: u64,
    msg_order: u64,
    mode: u64,
    wait_fd: c_int,
}

/// `struct dshim_cqe`: one completion.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Cqe {
    /// The operation's context pointer.
    pub ctx: *mut c_void,
    /// Completion flags.
    pub flags: u64,
    /// Bytes received (receives).
    pub len: u64,
}

impl Default for Cqe {
    fn default() -> Self {
        Cqe {
            ctx: std::ptr::null_mut(),
            flags: 0,
            len: 0,
        }
    }
}

/// `struct dshim_cqerr`: one error completion.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CqErr {
    /// The operation's context pointer.
    pub ctx: *mut c_void,
    /// Completion flags.
    pub flags: u64,
    /// libfabric error code (positive).
    pub err: c_int,
    /// Provider-specific code.
    pub prov_errno: c_int,
}

impl Default for CqErr {
    fn default() -> Self {
        CqErr {
            ctx: std::ptr::null_mut(),
            flags: 0,
            err: 0,
            prov_errno: 0,
        }
    }
}

#[cfg(dragon_ofi)]
mod c {
    use super::*;
    extern "C" {
        pub fn dshim_load(path: *const c_char, err: *mut c_char, errlen: usize) -> c_int;
        pub fn dshim_version() -> u32;
        pub fn dshim_header_version() -> u32;
        pub fn dshim_strerror(e: c_int) -> *const c_char;
        pub fn dshim_open(
            prov: *const c_char,
            node: *const c_char,
            out: *mut *mut RawEp,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn dshim_attrs(e: *const RawEp, a: *mut RawAttrs);
        pub fn dshim_close_ep(e: *mut RawEp);
        pub fn dshim_close(e: *mut RawEp);
        pub fn dshim_getname(e: *mut RawEp, buf: *mut c_void, len: *mut usize) -> c_int;
        pub fn dshim_av_insert(e: *mut RawEp, addr: *const c_void, fi_addr: *mut u64) -> c_int;
        pub fn dshim_mr_reg(
            e: *mut RawEp,
            buf: *mut c_void,
            len: usize,
            access: u64,
            key: u64,
            mr: *mut *mut RawMr,
            desc: *mut *mut c_void,
            key_out: *mut u64,
        ) -> c_int;
        pub fn dshim_mr_close(mr: *mut RawMr) -> c_int;
        pub fn dshim_send(
            e: *mut RawEp,
            buf: *const c_void,
            len: usize,
            desc: *mut c_void,
            dest: u64,
            ctx: *mut c_void,
        ) -> isize;
        pub fn dshim_inject(e: *mut RawEp, buf: *const c_void, len: usize, dest: u64) -> isize;
        pub fn dshim_recv(
            e: *mut RawEp,
            buf: *mut c_void,
            len: usize,
            desc: *mut c_void,
            ctx: *mut c_void,
        ) -> isize;
        #[allow(clippy::too_many_arguments)]
        pub fn dshim_read(
            e: *mut RawEp,
            buf: *mut c_void,
            len: usize,
            desc: *mut c_void,
            src: u64,
            addr: u64,
            key: u64,
            ctx: *mut c_void,
        ) -> isize;
        pub fn dshim_cq_read(e: *mut RawEp, out: *mut Cqe, n: usize) -> isize;
        pub fn dshim_trywait(e: *mut RawEp) -> c_int;
        pub fn dshim_cq_readerr(e: *mut RawEp, out: *mut CqErr) -> c_int;
        pub fn dshim_cq_signal(e: *mut RawEp) -> c_int;
    }
}

/// Stand-ins with the shim's signatures when the crate was built without libfabric headers:
/// loading fails, so no other function is ever reached.
#[cfg(not(dragon_ofi))]
#[allow(clippy::missing_safety_doc, clippy::too_many_arguments)]
mod c {
    use super::*;
    const ENOSYS: c_int = 38;
    pub unsafe fn dshim_load(_: *const c_char, _: *mut c_char, _: usize) -> c_int {
        -1
    }
    pub unsafe fn dshim_version() -> u32 {
        0
    }
    pub unsafe fn dshim_header_version() -> u32 {
        0
    }
    pub unsafe fn dshim_strerror(_: c_int) -> *const c_char {
        c"libfabric support not built".as_ptr()
    }
    pub unsafe fn dshim_open(
        _: *const c_char,
        _: *const c_char,
        _: *mut *mut RawEp,
        _: *mut c_char,
        _: usize,
    ) -> c_int {
        -ENOSYS
    }
    pub unsafe fn dshim_attrs(_: *const RawEp, _: *mut RawAttrs) {}
    pub unsafe fn dshim_close_ep(_: *mut RawEp) {}
    pub unsafe fn dshim_close(_: *mut RawEp) {}
    pub unsafe fn dshim_getname(_: *mut RawEp, _: *mut c_void, _: *mut usize) -> c_int {
        -ENOSYS
    }
    pub unsafe fn dshim_av_insert(_: *mut RawEp, _: *const c_void, _: *mut u64) -> c_int {
        -ENOSYS
    }
    pub unsafe fn dshim_mr_reg(
        _: *mut RawEp,
        _: *mut c_void,
        _: usize,
        _: u64,
        _: u64,
        _: *mut *mut RawMr,
        _: *mut *mut c_void,
        _: *mut u64,
    ) -> c_int {
        -ENOSYS
    }
    pub unsafe fn dshim_mr_close(_: *mut RawMr) -> c_int {
        -ENOSYS
    }
    pub unsafe fn dshim_send(
        _: *mut RawEp,
        _: *const c_void,
        _: usize,
        _: *mut c_void,
        _: u64,
        _: *mut c_void,
    ) -> isize {
        -(ENOSYS as isize)
    }
    pub unsafe fn dshim_inject(_: *mut RawEp, _: *const c_void, _: usize, _: u64) -> isize {
        -(ENOSYS as isize)
    }
    pub unsafe fn dshim_recv(
        _: *mut RawEp,
        _: *mut c_void,
        _: usize,
        _: *mut c_void,
        _: *mut c_void,
    ) -> isize {
        -(ENOSYS as isize)
    }
    pub unsafe fn dshim_read(
        _: *mut RawEp,
        _: *mut c_void,
        _: usize,
        _: *mut c_void,
        _: u64,
        _: u64,
        _: u64,
        _: *mut c_void,
    ) -> isize {
        -(ENOSYS as isize)
    }
    pub unsafe fn dshim_cq_read(_: *mut RawEp, _: *mut Cqe, _: usize) -> isize {
        -(ENOSYS as isize)
    }
    pub unsafe fn dshim_trywait(_: *mut RawEp) -> c_int {
        -ENOSYS
    }
    pub unsafe fn dshim_cq_readerr(_: *mut RawEp, _: *mut CqErr) -> c_int {
        -ENOSYS
    }
    pub unsafe fn dshim_cq_signal(_: *mut RawEp) -> c_int {
        -ENOSYS
    }
}

/// Whether this build contains the libfabric shim.
pub const BUILT: bool = cfg!(dragon_ofi);

fn cstr_field(b: &[c_char]) -> String {
    let bytes: Vec<u8> = b
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Text of a libfabric error code (either sign).
pub fn strerror(e: i64) -> String {
    let code = e.unsigned_abs().min(i32::MAX as u64) as c_int;
    // SAFETY: dshim_strerror returns a pointer to a static NUL-terminated string (libfabric's
    // table, or the shim's own literal), valid for the life of the process.
    unsafe { CStr::from_ptr(c::dshim_strerror(code)) }
        .to_string_lossy()
        .into_owned()
}

static LOADED: OnceLock<Result<String, String>> = OnceLock::new();
static LOAD_LOCK: Mutex<()> = Mutex::new(());

/// Loads libfabric once per process from `path` (a library file, or a directory holding
/// `libfabric.so.1`). Returns the loaded version (`"1.17"`) or why it cannot be used. Later
/// calls return the first outcome whatever their path.
pub fn load(path: &str) -> Result<String, String> {
    let _g = LOAD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    LOADED
        .get_or_init(|| {
            if !BUILT {
                return Err("built without libfabric headers (rdma/fabric.h)".into());
            }
            let p = std::path::Path::new(path);
            let file = if p.is_dir() {
                p.join("libfabric.so.1").to_string_lossy().into_owned()
            } else {
                path.to_string()
            };
            let cpath = CString::new(file.clone()).map_err(|_| "bad library path".to_string())?;
            let mut err = [0 as c_char; 512];
            // SAFETY: cpath is NUL-terminated; err is a writable buffer of the given length.
            // The shim serializes nothing itself: LOAD_LOCK and the OnceLock make this the
            // only call.
            let r = unsafe { c::dshim_load(cpath.as_ptr(), err.as_mut_ptr(), err.len()) };
            if r != 0 {
                return Err(cstr_field(&err));
            }
            // SAFETY: plain getters of the shim, valid after a successful load.
            let (v, hv) = unsafe { (c::dshim_version(), c::dshim_header_version()) };
            if v >> 16 != hv >> 16 {
                return Err(format!(
                    "{file}: libfabric {}.{} does not match the headers' major version {}",
                    v >> 16,
                    v & 0xffff,
                    hv >> 16
                ));
            }
            Ok(format!("{}.{}", v >> 16, v & 0xffff))
        })
        .clone()
}

/// Attributes of an opened endpoint.
#[derive(Debug, Clone)]
pub struct Attrs {
    /// Provider name (`tcp;ofi_rxm`, `shm`, ...).
    pub prov: String,
    /// Fabric name.
    pub fabric: String,
    /// The domain's `mr_mode` bits.
    pub mr_mode: u64,
    /// Largest message `fi_inject` takes.
    pub inject_size: usize,
    /// Largest message or RMA transfer.
    pub max_msg_size: usize,
    /// Bytes of a memory key.
    pub mr_key_size: usize,
    /// Descriptor that polls readable when the CQ needs reading (`FI_WAIT_FD`), if any.
    pub wait_fd: Option<i32>,
}

/// One RDM endpoint with its fabric, domain, CQ and AV. `Send + Sync`: the domain is opened
/// with `FI_THREAD_SAFE`. Dropping it closes everything (memory regions must go first).
pub struct Ep {
    raw: *mut RawEp,
    /// Its attributes.
    pub attrs: Attrs,
}

// SAFETY: the domain is opened with FI_THREAD_SAFE, so every libfabric call on the endpoint
// may come from any thread, concurrently; the pointer is owned (freed once, in Drop).
unsafe impl Send for Ep {}
// SAFETY: as above: FI_THREAD_SAFE makes concurrent calls through &Ep sound.
unsafe impl Sync for Ep {}

impl std::fmt::Debug for Ep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ep").field("attrs", &self.attrs).finish()
    }
}

/// A registered memory region.
#[derive(Debug)]
pub struct Mr {
    raw: *mut RawMr,
    /// Local descriptor for operations on the region.
    pub desc: *mut c_void,
    /// Key remote peers use.
    pub key: u64,
}

// SAFETY: a region handle is a plain provider object; closing it (the only mutation) takes
// `&mut self`/`self`; the descriptor is an opaque token passed back to libfabric.
unsafe impl Send for Mr {}
// SAFETY: as above; shared use only reads `desc`/`key`.
unsafe impl Sync for Mr {}

impl Mr {
    /// Closes the region. The endpoint must no longer use it.
    pub fn close(self) {
        // SAFETY: `raw` came from a successful dshim_mr_reg and is closed only here, once
        // (self is consumed).
        unsafe { c::dshim_mr_close(self.raw) };
    }
}

impl Ep {
    /// Opens an endpoint of `prov` bound to `node` (an IP address, or `None`).
    pub fn open(prov: &str, node: Option<&str>) -> Result<Ep, String> {
        let cprov = CString::new(prov).map_err(|_| "bad provider name".to_string())?;
        let cnode = match node {
            Some(n) => Some(CString::new(n).map_err(|_| "bad node".to_string())?),
            None => None,
        };
        let mut raw: *mut RawEp = std::ptr::null_mut();
        let mut err = [0 as c_char; 512];
        // SAFETY: strings are NUL-terminated (or null for node); `raw` and `err` are valid
        // out-pointers of the declared sizes.
        let r = unsafe {
            c::dshim_open(
                cprov.as_ptr(),
                cnode.as_ref().map_or(std::ptr::null(), |n| n.as_ptr()),
                &mut raw,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if r != 0 || raw.is_null() {
            let e = cstr_field(&err);
            return Err(if e.is_empty() { strerror(r.into()) } else { e });
        }
        let mut a = RawAttrs {
            prov: [0; 64],
            fabric: [0; 64],
            mr_mode: 0,
            inject_size: 0,
            max_msg_size: 0,
            tx_size: 0,
            rx_size: 0,
            mr_key_size: 0,
            msg_order: 0,
            mode: 0,
            wait_fd: -1,
        };
        // SAFETY: raw is a live endpoint; `a` is a valid out-pointer.
        unsafe { c::dshim_attrs(raw, &mut a) };
        Ok(Ep {
            raw,
            attrs: Attrs {
                prov: cstr_field(&a.prov),
                fabric: cstr_field(&a.fabric),
                mr_mode: a.mr_mode,
                inject_size: a.inject_size as usize,
                max_msg_size: a.max_msg_size.min(usize::MAX as u64) as usize,
                mr_key_size: a.mr_key_size as usize,
                wait_fd: (a.wait_fd >= 0).then_some(a.wait_fd),
            },
        })
    }

    /// This endpoint's address.
    pub fn name(&self) -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; 1024];
        let mut len = buf.len();
        // SAFETY: buf has `len` writable bytes; the shim writes at most that and stores the
        // real length.
        let r = unsafe { c::dshim_getname(self.raw, buf.as_mut_ptr().cast(), &mut len) };
        if r != 0 {
            return Err(r);
        }
        buf.truncate(len.min(1024));
        Ok(buf)
    }

    /// Inserts a peer's address into the AV.
    pub fn av_insert(&self, addr: &[u8]) -> Result<u64, i32> {
        let mut a = u64::MAX;
        // The provider reads as many bytes as its address format takes (or up to a NUL for
        // string formats), whatever the peer sent: pad with zeros so it never reads past.
        let mut padded = vec![0u8; (addr.len() + 1).max(1024)];
        padded[..addr.len()].copy_from_slice(addr);
        // SAFETY: `padded` holds the address followed by at least 1024 - len zero bytes,
        // more than any provider's address format; the out-pointer is valid.
        let r = unsafe { c::dshim_av_insert(self.raw, padded.as_ptr().cast(), &mut a) };
        if r != 0 {
            return Err(r);
        }
        Ok(a)
    }

    /// Registers `[ptr, ptr + len)` with `access`, asking for `key`.
    ///
    /// # Safety
    /// The memory must stay mapped until the region is closed, and the endpoint must not be
    /// closed before the region.
    pub unsafe fn mr_reg(
        &self,
        ptr: *mut u8,
        len: usize,
        access: u64,
        key: u64,
    ) -> Result<Mr, i32> {
        let mut mr: *mut RawMr = std::ptr::null_mut();
        let mut desc: *mut c_void = std::ptr::null_mut();
        let mut k = 0u64;
        // SAFETY: out-pointers are valid; the memory contract is the caller's.
        let r = unsafe {
            c::dshim_mr_reg(
                self.raw,
                ptr.cast(),
                len,
                access,
                key,
                &mut mr,
                &mut desc,
                &mut k,
            )
        };
        if r != 0 {
            return Err(r);
        }
        Ok(Mr {
            raw: mr,
            desc,
            key: k,
        })
    }

    /// Posts a send. Returns 0 or a negative libfabric code (`-FI_EAGAIN`: retry).
    ///
    /// # Safety
    /// `buf[..len]` must stay valid and unchanged, and `ctx` must point at 64 writable
    /// bytes, until the send's completion is read from the CQ (or the endpoint is closed).
    pub unsafe fn send(
        &self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        dest: u64,
        ctx: *mut c_void,
    ) -> isize {
        // SAFETY: forwarded contract.
        unsafe { c::dshim_send(self.raw, buf.cast(), len, desc, dest, ctx) }
    }

    /// Sends a small message (at most `inject_size` bytes); the buffer is free on return.
    pub fn inject(&self, buf: &[u8], dest: u64) -> isize {
        // SAFETY: fi_inject copies the bytes before it returns; no completion follows.
        unsafe { c::dshim_inject(self.raw, buf.as_ptr().cast(), buf.len(), dest) }
    }

    /// Posts a receive buffer.
    ///
    /// # Safety
    /// `buf[..len]` must stay valid and otherwise unused, and `ctx` must point at 64
    /// writable bytes, until the receive's completion is read (or the endpoint is closed).
    pub unsafe fn recv(
        &self,
        buf: *mut u8,
        len: usize,
        desc: *mut c_void,
        ctx: *mut c_void,
    ) -> isize {
        // SAFETY: forwarded contract.
        unsafe { c::dshim_recv(self.raw, buf.cast(), len, desc, ctx) }
    }

    /// Posts an RMA read of `len` bytes at remote address `addr` (key `key`) of `src` into
    /// `buf`.
    ///
    /// # Safety
    /// `buf[..len]` must stay valid (and is written by the provider), and `ctx` must point at
    /// 64 writable bytes, until the read's completion is read (or the endpoint is closed).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn read(
        &self,
        buf: *mut u8,
        len: usize,
        desc: *mut c_void,
        src: u64,
        addr: u64,
        key: u64,
        ctx: *mut c_void,
    ) -> isize {
        // SAFETY: forwarded contract.
        unsafe { c::dshim_read(self.raw, buf.cast(), len, desc, src, addr, key, ctx) }
    }

    /// Reads completions without blocking: the count read, 0 when none, or a negative code
    /// (`-FI_EAVAIL`: an error completion waits).
    pub fn cq_read(&self, out: &mut [Cqe]) -> isize {
        // SAFETY: `out` has out.len() writable entries; the shim writes at most that many
        // (and at most 64).
        unsafe { c::dshim_cq_read(self.raw, out.as_mut_ptr(), out.len()) }
    }

    /// Whether blocking in `poll()` on [`Attrs::wait_fd`] is safe now (nothing to read).
    pub fn trywait(&self) -> bool {
        // SAFETY: the endpoint is live (we hold &self).
        unsafe { c::dshim_trywait(self.raw) == 0 }
    }

    /// Reads one error completion.
    pub fn cq_readerr(&self) -> Option<CqErr> {
        let mut e = CqErr::default();
        // SAFETY: `e` is a valid out-pointer.
        let r = unsafe { c::dshim_cq_readerr(self.raw, &mut e) };
        (r == 0).then_some(e)
    }

    /// Makes [`Attrs::wait_fd`] readable (wakes a thread polling it).
    pub fn cq_signal(&self) {
        // SAFETY: the endpoint is live (we hold &self).
        unsafe { c::dshim_cq_signal(self.raw) };
    }

    /// Closes the endpoint proper: pending operations are cancelled and no buffer or context
    /// of them is touched after this returns. The CQ, AV and domain stay until drop.
    pub fn close_ep(&self) {
        // SAFETY: idempotent in the shim (it clears its pointer); callers serialize closing
        // against every other use (the transport's state lock, after its threads ended).
        unsafe { c::dshim_close_ep(self.raw) };
    }
}

impl Drop for Ep {
    fn drop(&mut self) {
        // SAFETY: `raw` came from dshim_open and is freed only here, once.
        unsafe { c::dshim_close(self.raw) };
    }
}
