//! The fast object client: one connection per (thread, node), calls made with the GIL
//! released, replies read straight into a block of this node's pool.

use super::*;

/// One connection of this thread to a node's fast object server.
struct Conn {
    s: TcpStream,
    pid: u32,
    /// The server moves large block messages by RMA.
    rma: bool,
}

thread_local! {
    static CONNS: RefCell<HashMap<String, Conn>> = RefCell::new(HashMap::new());
}

fn keepalive(s: &TcpStream) {
    let fd = s.as_raw_fd();
    for (level, opt, v) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 2),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        let v: libc::c_int = v;
        // SAFETY: `fd` is the open socket `s` owns for this call; `v` is a c_int that lives
        // across the call and its size is passed with it.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// A connection to the server at `addr`, and whether the server moves large block messages
/// by RMA.
fn connect(addr: &str, ticket: &[u8]) -> io::Result<(TcpStream, bool)> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| io::Error::other("bad address"))?;
    let port: u16 = port.parse().map_err(|_| io::Error::other("bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let sa = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other("no address"))?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(10))?;
    s.set_nodelay(true)?;
    keepalive(&s);
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&ticket[..TICKET_LEN.min(ticket.len())])?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    if ack[0] != 1 && ack[0] != 2 {
        return Err(io::Error::other("the object server refused the ticket"));
    }
    Ok((s, ack[0] == 2))
}

/// Where the reading of one reply stands.
#[derive(Default)]
struct ReplyIn {
    len: [u8; 8],
    got_len: usize,
    head: Vec<u8>,
    /// A DDict read's working set and found flag (17 bytes), before its value.
    prefix: Vec<u8>,
    body: Option<Vec<u8>>,
    block: Option<dragon_shm::heap::Block>,
    /// The block this client offered for an RMA transfer (it takes the message when the
    /// server answers `8`, or the bytes when it answers `5`).
    rma_dst: Option<dragon_shm::heap::Block>,
    /// Why no local block took a block message (it is read, then this is raised).
    alloc_err: Option<dragon_shm::heap::AllocError>,
    filled: usize,
}

enum Progress {
    Done,
    Pending,
}

/// Reads on from where `st` stands, for at most one read time-out.
fn read_reply(s: &mut TcpStream, st: &mut ReplyIn, pool: Option<&PyPool>) -> io::Result<Progress> {
    let pending = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
        )
    };
    macro_rules! read_into {
        ($buf:expr) => {
            match s.read($buf) {
                Ok(0) => return Err(io::Error::other("the connection ended")),
                Ok(k) => k,
                Err(e) if pending(&e) => return Ok(Progress::Pending),
                Err(e) => return Err(e),
            }
        };
    }
    while st.got_len < 8 {
        let k = read_into!(&mut st.len[st.got_len..]);
        st.got_len += k;
    }
    let total = u64::from_le_bytes(st.len) as usize;
    if total < 2 {
        return Err(io::Error::other("a short reply"));
    }
    while st.head.len() < 2 {
        let mut b = [0u8; 2];
        let want = 2 - st.head.len();
        let k = read_into!(&mut b[..want]);
        st.head.extend_from_slice(&b[..k]);
    }
    let want = if st.head == [0, 6] { 17 } else { 0 };
    if total < 2 + want {
        return Err(io::Error::other("a short reply"));
    }
    while st.prefix.len() < want {
        let mut b = [0u8; 17];
        let left = want - st.prefix.len();
        let k = read_into!(&mut b[..left]);
        st.prefix.extend_from_slice(&b[..k]);
    }
    let rest = total - 2 - want;
    let block_msg = st.head == [0, 5] || (st.head == [0, 6] && st.prefix[16] == 1);
    if st.body.is_none() && st.block.is_none() {
        if block_msg && st.rma_dst.as_ref().is_some_and(|d| d.len() == rest) {
            st.block = st.rma_dst.take();
        }
        if block_msg && rest > 0 && st.block.is_none() {
            if let Some(p) = pool {
                match p.inner.alloc(rest) {
                    Ok(b) => st.block = Some(b),
                    Err(e) => st.alloc_err = Some(e),
                }
            }
        }
        if st.block.is_none() {
            st.body = Some(vec![0u8; rest]);
        }
    }
    let buf: &mut [u8] = match (&mut st.block, &mut st.body) {
        (Some(b), _) => &mut b.as_mut_slice()[..rest],
        (None, Some(v)) => v,
        (None, None) => unreachable!("one of them is set above"),
    };
    while st.filled < rest {
        let k = read_into!(&mut buf[st.filled..]);
        st.filled += k;
    }
    Ok(Progress::Done)
}

/// Runs `op` on the object `kind` at `ref` of pool `pool`, served by the fast object server
/// at `addr` (`ip:port`, ticket `ticket`): `send` (payload `data`), `recv`, `len`, `acquire`
/// (`block`, `timeout`), `release` (`n` units), `value` (`is_locked`, `count`, `get_value`
/// or `is_set`), `is_mine`, `set`, `clear`, `wait` (`timeout`). A received message larger
/// than the channel's slots lands in a block of `local_pool` (returned as a `Block`; a
/// `bytearray` when that pool has no room), a smaller one is `bytes`. A server that cannot be reached or is lost is `NodeLostError`.
#[pyfunction]
#[pyo3(signature = (addr, ticket, op, kind, pool, r, block=true, timeout=None, n=1, data=None, local_pool=None, as_block=false, parts=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn objcall(
    py: Python<'_>,
    addr: &str,
    ticket: &[u8],
    op: &str,
    kind: &str,
    pool: &str,
    r: RefTuple,
    block: bool,
    timeout: Option<f64>,
    n: u32,
    data: Option<pyo3::buffer::PyBuffer<u8>>,
    local_pool: Option<&PyPool>,
    as_block: bool,
    parts: Option<Vec<pyo3::buffer::PyBuffer<u8>>>,
) -> Result<Py<PyAny>> {
    let (Some(opc), Some(kc)) = (op_code(op), kind_code(kind)) else {
        return Err(Error::value(format!(
            "no fast operation {op:?} on a {kind}"
        )));
    };
    if let Some(t) = timeout {
        if t.is_nan() {
            return Err(Error::value("timeout must be a number"));
        }
    }
    let mut req = Vec::with_capacity(8 + HEAD + pool.len() + 64);
    req.extend_from_slice(&[0u8; 8]);
    let flags = if block { F_BLOCK } else { 0 } | if as_block { F_AS_BLOCK } else { 0 };
    req.extend_from_slice(&[opc, kc, flags, 0]);
    req.extend_from_slice(&n.to_le_bytes());
    req.extend_from_slice(&timeout.map_or(-1.0, |t| t.max(0.0)).to_le_bytes());
    req.extend_from_slice(&r.0.to_le_bytes());
    req.extend_from_slice(&r.1.to_le_bytes());
    req.extend_from_slice(&r.2.to_le_bytes());
    req.extend_from_slice(&r.3.to_le_bytes());
    req.extend_from_slice(&(pool.len() as u16).to_le_bytes());
    req.extend_from_slice(pool.as_bytes());
    if let Some(d) = &data {
        if !d.is_c_contiguous() {
            return Err(Error::value("send takes a C-contiguous buffer"));
        }
        let len = d.len_bytes();
        if len > 0 {
            let at = req.len();
            req.resize(at + len, 0);
            d.copy_to_slice(py, &mut req[at..])?;
        }
    }
    // Buffers sent after `data` as they are, with the GIL released (a large block message:
    // no copy on this side; the server reads it straight into a block).
    let mut spans: Vec<&[u8]> = Vec::new();
    for b in parts.iter().flatten() {
        if !b.is_c_contiguous() {
            return Err(Error::value("send takes C-contiguous buffers"));
        }
        if b.len_bytes() > 0 {
            // SAFETY: `b` is a C-contiguous export of `len_bytes()` bytes held (in `parts`)
            // until this call returns, so the memory stays valid and unresized; as for any
            // send, a writer racing with it in another thread is the program's own race.
            spans.push(unsafe {
                std::slice::from_raw_parts(b.buf_ptr() as *const u8, b.len_bytes())
            });
        }
    }
    let extra: usize = spans.iter().map(|s| s.len()).sum();
    let total = (req.len() - 8 + extra) as u64;
    req[..8].copy_from_slice(&total.to_le_bytes());

    let lost = |e: io::Error| {
        let node = pool
            .trim_start_matches('/')
            .split('-')
            .nth(2)
            .unwrap_or("?");
        Error::Raise(
            Class::NodeLost,
            format!("node {node} was lost (its object server at {addr}: {e})"),
        )
    };
    let pid = std::process::id();
    let conn = CONNS.with(|c| c.borrow_mut().remove(addr));
    let mut conn = match conn {
        Some(c) if c.pid == pid => c,
        _ => {
            let (s, rma) = py.detach(|| connect(addr, ticket)).map_err(lost)?;
            Conn { s, pid, rma }
        }
    };
    // Large block messages by RMA, when the server can and this node's pool is given (the
    // node of the other end of the transfer is the pool's).
    let rma_pool = local_pool.filter(|_| conn.rma);
    let mut rma_src = None;
    if let Some(p) = rma_pool {
        if opc == OP_RECV || opc == OP_LOCKED_RECV {
            req[8 + 2] |= F_RMA;
        } else if opc == OP_SEND && as_block && data.is_none() && extra >= rma::RMA_MIN {
            // (The payload of such a request is only the block's reference and length.)
            // The message goes into a block of this node; the server fetches it from there.
            if let Ok(mut b) = p.inner.alloc(extra) {
                py.detach(|| {
                    let mut at = 0;
                    let dst = b.as_mut_slice();
                    for sp in &spans {
                        dst[at..at + sp.len()].copy_from_slice(sp);
                        at += sp.len();
                    }
                });
                let node = p.inner.name().node;
                req.extend_from_slice(&rma::Dest::encode(Some(rma::Dest::of(node, &b))));
                req.extend_from_slice(&(extra as u64).to_le_bytes());
                req[8 + 2] |= F_RMA;
                let total = (req.len() - 8) as u64;
                req[..8].copy_from_slice(&total.to_le_bytes());
                spans.clear();
                rma_src = Some(b);
            }
        }
    }
    py.detach(|| {
        conn.s.set_read_timeout(Some(CLIENT_SLICE))?;
        super::write_parts(
            &mut conn.s,
            std::iter::once(&req[..]).chain(spans.iter().copied()),
        )
    })
    .map_err(lost)?;
    // A reply to a small request may come back within the spin; a large request's takes
    // the server's whole read of it, and spinning would only take a CPU the server needs.
    let spin = req.len() + spans.iter().map(|s| s.len()).sum::<usize>() <= SPIN_REQUEST_MAX;
    let mut st = ReplyIn::default();
    loop {
        match py.detach(|| {
            if spin && st.got_len == 0 {
                spin_readable(&conn.s);
            }
            read_reply(&mut conn.s, &mut st, local_pool)
        }) {
            Ok(Progress::Done) if st.head == [0, 7] => {
                // An RMA offer: answer with a block of this node for the message (or none:
                // then the server sends its bytes).
                let n = st.body.as_deref().and_then(|b| b.try_into().ok());
                let Some(n) = n.map(u64::from_le_bytes) else {
                    return Err(Error::runtime("the object server sent a bad reply"));
                };
                let got = rma_pool.and_then(|p| Some((p, p.inner.alloc(n.max(1) as usize).ok()?)));
                let dest = got
                    .as_ref()
                    .map(|(p, b)| rma::Dest::of(p.inner.name().node, b));
                let d = got.map(|(_, b)| b);
                py.detach(|| conn.s.write_all(&rma::Dest::encode(dest)))
                    .map_err(lost)?;
                st = ReplyIn {
                    rma_dst: d,
                    ..ReplyIn::default()
                };
            }
            Ok(Progress::Done) => break,
            Ok(Progress::Pending) => py.check_signals()?, // an exception drops `conn`
            Err(e) => return Err(lost(e)),
        }
    }
    CONNS.with(|c| c.borrow_mut().insert(addr.to_string(), conn));
    if rma_src.take().is_some() && st.head.first() == Some(&0) {
        rma::count_put();
    }
    if st.head == [0, 8] {
        // The offered message is in our block.
        let Some(b) = st.rma_dst.take() else {
            return Err(Error::runtime("the object server sent a bad reply"));
        };
        rma::count_get();
        return Ok(Py::new(
            py,
            PyBlock {
                inner: b,
                readonly: false,
            },
        )?
        .into_any());
    }
    // A message taken from its channel is never dropped: when no local block could be had
    // it arrives in process memory (a bytearray in the same parts layout). A DDict read
    // (range_and_get) takes nothing away, so it raises the pool's error.
    if let Some(e) = st.alloc_err {
        if st.head != [0, 5] {
            return Err(e.into());
        }
        let body = st.body.as_deref().unwrap_or(&[]);
        return Ok(pyo3::types::PyByteArray::new(py, body).into_any().unbind());
    }
    let body = st.body.as_deref().unwrap_or(&[]);
    match st.head[0] {
        0 => Ok(match st.head[1] {
            0 => py.None(),
            1 => false.into_py_any(py)?,
            2 => true.into_py_any(py)?,
            3 if body.len() == 8 => {
                let v = u64::from_le_bytes(body.try_into().expect("8 bytes"));
                v.into_py_any(py)?
            }
            4 => PyBytes::new(py, body).into_any().unbind(),
            5 => match st.block.take() {
                Some(b) => Py::new(
                    py,
                    PyBlock {
                        inner: b,
                        readonly: false,
                    },
                )?
                .into_any(),
                None => PyBytes::new(py, body).into_any().unbind(),
            },
            6 => {
                let u = |i: usize| u64::from_le_bytes(st.prefix[i..i + 8].try_into().expect("8"));
                let range = (u(0), u(8));
                let value = match (st.prefix[16], st.block.take()) {
                    (0, _) => py.None(),
                    (_, Some(b)) => Py::new(
                        py,
                        PyBlock {
                            inner: b,
                            readonly: true,
                        },
                    )?
                    .into_any(),
                    (_, None) => PyBytes::new(py, body).into_any().unbind(),
                };
                (range, value).into_py_any(py)?
            }
            _ => return Err(Error::runtime("the object server sent a bad reply")),
        }),
        _ if !body.is_empty() => Err(error_of(st.head[1], body[0], &body[1..])),
        _ => Err(Error::runtime("the object server sent a bad reply")),
    }
}

/// `(received, sent)`: how many block messages this process took and gave by RMA over its
/// node's transport (not through the object server's socket).
#[pyfunction]
pub(crate) fn objfast_rma_counts() -> (u64, u64) {
    rma::counts()
}
