//! The agent's serving thread: decodes requests from the request channel, answers them on
//! each requester's reply channel, launches processes, and does the periodic maintenance
//! (reaping, dropping reply channels of dead processes, sweeping holds).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dragon_shm::channel::{Channel, ChannelError};
use dragon_shm::heap::Pool;
use dragon_shm::name::{SegmentKind, SegmentName};
use nix::errno::Errno;
use nix::unistd::Pid;

use super::state::{Origin, Proc};
use super::{agent_err, block_ref, os_err, remote, Shared, MAINTENANCE_EVERY};
use crate::proto::{
    decode, encode, AgentError, Envelope, IdKind, Launch, ProcInfo, Reply, ReplyEnvelope, Request,
    StdioReq,
};
use crate::spawn::{pidfd_getfd, pidfd_open, spawn, SpawnSpec, Stdio};

pub(super) fn block_all_signals() {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), None);
}

pub(super) fn serve(sh: &Shared) {
    block_all_signals();
    let mut last = Instant::now();
    while !sh.stop.load(Ordering::SeqCst) {
        match sh.requests.recv(Some(MAINTENANCE_EVERY)) {
            Ok(m) => handle(sh, m.bytes()),
            Err(ChannelError::TimedOut) | Err(ChannelError::Empty) => {}
            Err(ChannelError::Closed) => break,
            Err(e) => {
                tracing::error!("request channel failed, the agent stops serving: {e}");
                break;
            }
        }
        if last.elapsed() >= MAINTENANCE_EVERY {
            last = Instant::now();
            maintenance(sh);
        }
    }
}

fn maintenance(sh: &Shared) {
    sh.reap();
    // Reply channels of processes that ended, or of clients that were dropped (they close
    // their channel), go: their blocks are then freed.
    sh.replies().retain(|_, (pid, ch)| {
        !ch.is_closed() && nix::sys::signal::kill(Pid::from_raw(*pid as i32), None).is_ok()
    });
    sh.pool.sweep();
}

fn handle(sh: &Shared, bytes: &[u8]) {
    let env: Envelope = match decode(bytes) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!("dropped a request that does not decode: {e}");
            return;
        }
    };
    let origin = Origin::Local {
        reply: env.reply,
        requester: env.requester,
        seq: env.seq,
    };
    if let Some(reply) = respond(sh, env.body, origin) {
        answer(sh, origin, reply);
    }
}

/// Answers `body` from `origin` now (`Some`), or later (`None`: forwarded to another node's
/// agent, or a `Wait` for a process that still runs; [`answer`] is called then).
pub(super) fn respond(sh: &Shared, body: Request, origin: Origin) -> Option<Reply> {
    if let Some(node) = remote::route(sh, &body) {
        return remote::forward(sh, node, body, origin);
    }
    let requester = match origin {
        Origin::Local { requester, .. } => Some(requester),
        Origin::Remote { .. } => None,
    };
    Some(match body {
        Request::Remote { body, .. } => return respond(sh, *body, origin),
        Request::Launch(l) => match launch(sh, l, requester) {
            Ok((puid, pid)) => Reply::Launched { puid, pid },
            Err(e) => Reply::Error(e),
        },
        Request::Status { puid } => match sh.state().status(puid) {
            Ok((pid, exit_code)) => Reply::Status { pid, exit_code },
            Err(e) => Reply::Error(e),
        },
        Request::Wait { puid } => {
            let mut st = sh.state();
            match st.status(puid) {
                Ok((pid, Some(code))) => Reply::Status {
                    pid,
                    exit_code: Some(code),
                },
                Ok(_) => {
                    st.waiters.entry(puid).or_default().push(origin);
                    return None;
                }
                Err(e) => Reply::Error(e),
            }
        }
        Request::Signal { puid, sig } => {
            let mut st = sh.state();
            match st.status(puid) {
                Ok((pid, None)) => match nix::sys::signal::Signal::try_from(sig) {
                    Ok(s) => {
                        let _ = nix::sys::signal::kill(Pid::from_raw(pid), s);
                        Reply::Done
                    }
                    Err(_) => Reply::Error(AgentError::BadArgument(format!("signal {sig}"))),
                },
                Ok((_, Some(_))) => Reply::Done,
                Err(e) => Reply::Error(e),
            }
        }
        Request::Nodes => Reply::Nodes(
            sh.cluster
                .get()
                .map(|c| c.table().to_vec())
                .unwrap_or_default(),
        ),
        Request::Register {
            kind,
            name,
            value,
            replace,
        } => {
            let mut st = sh.state();
            let key = (kind, name);
            if !replace && st.names.contains_key(&key) {
                Reply::Error(AgentError::Exists(key.1))
            } else {
                st.names.insert(key, value);
                Reply::Done
            }
        }
        Request::Lookup { kind, name } => {
            Reply::Value(sh.state().names.get(&(kind, name)).cloned())
        }
        Request::Unregister { kind, name } => Reply::Value(sh.state().names.remove(&(kind, name))),
        Request::NewId { kind } => Reply::Id(sh.state().new_id(kind, sh.node)),
        Request::Processes => {
            let st = sh.state();
            let mut v: Vec<ProcInfo> = st
                .procs
                .iter()
                .map(|(&puid, p)| ProcInfo {
                    puid,
                    pid: p.pid,
                    exit_code: p.exit_code,
                    name: p.name.clone(),
                })
                .collect();
            v.sort_by_key(|p| p.puid);
            Reply::Processes(v)
        }
        Request::Ping => Reply::Pong(std::process::id()),
        Request::CreatePool { size } => {
            let mut st = sh.state();
            let m_uid = st.new_id(IdKind::Memory, sh.node);
            let name = SegmentName::new(sh.runtime, sh.node, SegmentKind::Pool, m_uid);
            match Pool::create(&name, size as usize) {
                Ok(p) => {
                    st.pools.insert(m_uid, p);
                    Reply::Pool {
                        m_uid,
                        name: name.to_string(),
                    }
                }
                Err(e) => Reply::Error(AgentError::NoMemory(format!("{e:?}"))),
            }
        }
        Request::DestroyPool { m_uid } => match sh.state().pools.remove(&m_uid) {
            Some(_) => Reply::Done,
            None => Reply::Error(AgentError::BadArgument(format!(
                "no pool with m_uid {m_uid}"
            ))),
        },
    })
}

/// Sends `reply` to whoever asked: a local process's reply channel, or the agent of the node
/// that forwarded the request.
pub(super) fn answer(sh: &Shared, origin: Origin, reply: Reply) {
    let (reply_ref, requester, seq) = match origin {
        Origin::Local {
            reply,
            requester,
            seq,
        } => (reply, requester, seq),
        Origin::Remote { node, id } => {
            remote::answer_remote(sh, node, id, reply);
            return;
        }
    };
    let out = encode(&ReplyEnvelope { seq, body: reply });
    let mut replies = sh.replies();
    let ch = match replies.entry(reply_ref) {
        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => {
            // SAFETY: the handle goes straight into a Channel, which never lends its block
            // mutably.
            let ch = unsafe { sh.pool.block(block_ref(reply_ref)) }
                .map_err(ChannelError::from)
                .and_then(Channel::attach);
            match ch {
                Ok(ch) => v.insert((requester, ch)),
                Err(e) => {
                    tracing::warn!("bad reply channel from pid {requester}, request dropped: {e}");
                    return;
                }
            }
        }
    };
    // A requester that stopped reading must not stall the agent.
    if ch.1.send(&out, Some(Duration::from_secs(1))).is_err() {
        replies.remove(&reply_ref);
    }
}

/// Launches `req` for `requester` (a local pid; `None` when another node's agent asked, whose
/// descriptors cannot reach this node: its streams are this agent's own, which the launcher
/// collects and labels with this node).
pub(super) fn launch(
    sh: &Shared,
    req: Launch,
    requester: Option<u32>,
) -> Result<(u64, i32), AgentError> {
    let remote = requester.is_none();
    let requester = requester.unwrap_or_else(std::process::id);
    if remote
        && (!req.fd_map.is_empty()
            || [req.stdin, req.stdout, req.stderr]
                .iter()
                .any(|s| matches!(s, StdioReq::Fd(_))))
    {
        return Err(AgentError::BadArgument(
            "descriptors cannot be passed to a process on another node".into(),
        ));
    }
    let own = requester == std::process::id();
    let pidfd = if own {
        None
    } else {
        Some(pidfd_open(requester as i32).map_err(|e| os_err("pidfd_open(requester)", e))?)
    };
    let mut held: Vec<OwnedFd> = vec![];
    let mut take = |fd: i32| -> Result<i32, Errno> {
        match &pidfd {
            None => Ok(fd),
            Some(p) => {
                let f = pidfd_getfd(p, fd)?;
                let raw = f.as_raw_fd();
                held.push(f);
                Ok(raw)
            }
        }
    };
    let mut stdio = |s: StdioReq, n: i32| -> Result<Stdio, AgentError> {
        Ok(match s {
            StdioReq::Null => Stdio::Null,
            StdioReq::Stdout => Stdio::Stdout,
            StdioReq::Inherit if own => Stdio::Inherit,
            StdioReq::Inherit => match take(n) {
                Ok(fd) => Stdio::Fd(fd),
                Err(Errno::EBADF) => Stdio::Null,
                Err(e) => return Err(os_err("pidfd_getfd", e)),
            },
            StdioReq::Fd(fd) => Stdio::Fd(take(fd).map_err(|e| os_err("pidfd_getfd", e))?),
        })
    };
    let stdin = stdio(req.stdin, 0)?;
    let stdout = stdio(req.stdout, 1)?;
    let stderr = stdio(req.stderr, 2)?;
    let mut fd_map = Vec::with_capacity(req.fd_map.len());
    for &(src, dst) in &req.fd_map {
        fd_map.push((take(src).map_err(|e| os_err("pidfd_getfd", e))?, dst));
    }
    let mut st = sh.state();
    let puid = st.new_id(IdKind::Process, sh.node);
    let mut env = req.env;
    env.retain(|(k, _)| k != "DRAGON_PUID");
    env.push(("DRAGON_PUID".into(), puid.to_string()));
    // A process of the runtime belongs to this node's agent, whichever node asked.
    if let Some(v) = env.iter_mut().find(|(k, _)| k == "DRAGON_RUNTIME") {
        v.1 = sh.env_value();
    }
    let spec = SpawnSpec {
        argv: req.argv,
        env,
        cwd: req.cwd.map(Into::into),
        stdin,
        stdout,
        stderr,
        cpus: req.cpus,
        new_process_group: req.new_group,
        die_with_parent: false,
        pass_fds: vec![],
        fd_map,
    };
    // The state lock is held across the spawn so that the reaper cannot see the child end
    // before it is recorded.
    let pid = spawn(&spec)
        .map_err(|e| {
            tracing::info!(
                "launch of {:?} for pid {requester} failed: {e}",
                spec.argv.first()
            );
            agent_err(e)
        })?
        .as_raw();
    tracing::debug!(
        "launched p_uid {puid} as pid {pid} for pid {requester}: {:?}",
        spec.argv
    );
    if let Some(n) = &req.name {
        st.names
            .insert(("process".into(), n.clone()), puid.to_le_bytes().to_vec());
    }
    st.procs.insert(
        puid,
        Proc {
            pid,
            exit_code: None,
            name: req.name,
        },
    );
    st.by_pid.insert(pid, puid);
    Ok((puid, pid))
}
