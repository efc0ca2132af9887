//! The agent's tables: launched processes and their exit codes, ids, the name registry and
//! the DDict managers' pools.

use std::collections::HashMap;

use dragon_shm::channel::Channel;
use dragon_shm::heap::Pool;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::ID_BASE;
use crate::proto::{AgentError, IdKind, WireRef};

#[derive(Debug)]
pub(super) struct Proc {
    pub(super) pid: i32,
    pub(super) exit_code: Option<i32>,
    pub(super) name: Option<String>,
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) procs: HashMap<u64, Proc>,
    pub(super) by_pid: HashMap<i32, u64>,
    pub(super) names: HashMap<(String, String), Vec<u8>>,
    pub(super) next_ids: [u64; 4],
    pub(super) pools: HashMap<u64, Pool>,
    /// Who waits (`Request::Wait`) for which running process.
    pub(super) waiters: HashMap<u64, Vec<Origin>>,
}

/// Who asked: a local process (answered on its reply channel) or another node's agent
/// (answered over the transport).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// A process of this node.
    Local {
        /// Its reply channel.
        reply: WireRef,
        /// Its pid.
        requester: u32,
        /// The request's sequence number.
        seq: u64,
    },
    /// The agent of `node`, which numbered its forward `id`.
    Remote {
        /// The asking node.
        node: u32,
        /// Its number for the answer.
        id: u64,
    },
}

/// Bits of an id below the node index: ids are `ID_BASE + (node << NODE_SHIFT) + n`, so every
/// node hands out ids without asking the primary and an id names the node it was made on.
pub const NODE_SHIFT: u32 = 40;

/// The node an id (p_uid, m_uid, ...) was made on.
pub fn node_of(id: u64) -> u32 {
    (id.saturating_sub(ID_BASE) >> NODE_SHIFT) as u32
}

/// Reply channels the serving thread has attached, by reference, with the requester's pid.
pub(super) type Replies = HashMap<WireRef, (u32, Channel)>;

impl State {
    pub(super) fn new_id(&mut self, kind: IdKind, node: u32) -> u64 {
        let slot = &mut self.next_ids[kind as usize];
        *slot += 1;
        ID_BASE + (u64::from(node) << NODE_SHIFT) + *slot
    }

    pub(super) fn record(&mut self, pid: i32, status: WaitStatus) -> Option<(u64, i32)> {
        let code = match status {
            WaitStatus::Exited(_, c) => c,
            WaitStatus::Signaled(_, s, _) => -(s as i32),
            _ => return None,
        };
        let puid = *self.by_pid.get(&pid)?;
        self.by_pid.remove(&pid);
        let p = self.procs.get_mut(&puid)?;
        p.exit_code = Some(code);
        Some((puid, code))
    }

    /// Reaps every ended child; returns the launched ones as (p_uid, pid, exit code).
    pub(super) fn reap(&mut self) -> Vec<(u64, i32, i32)> {
        let mut out = vec![];
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return out,
                Ok(st) => {
                    if let Some(pid) = st.pid() {
                        if let Some((puid, code)) = self.record(pid.as_raw(), st) {
                            tracing::debug!("p_uid {puid} (pid {pid}) ended: exit code {code}");
                            out.push((puid, pid.as_raw(), code));
                        }
                    }
                }
            }
        }
    }

    pub(super) fn status(&mut self, puid: u64) -> Result<(i32, Option<i32>), AgentError> {
        let (pid, code) = match self.procs.get(&puid) {
            None => return Err(AgentError::NoSuchProcess(puid)),
            Some(p) => (p.pid, p.exit_code),
        };
        if code.is_some() {
            return Ok((pid, code));
        }
        if let Ok(st) = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            if let Some((_, c)) = self.record(pid, st) {
                return Ok((pid, Some(c)));
            }
        }
        Ok((pid, None))
    }
}
