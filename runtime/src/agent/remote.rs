//! Requests between the agents of a multi-node runtime.
//!
//! A request a local process sends to its agent is answered by another node's agent when
//! [`route`] says so: `Request::Remote { node, .. }` names the node; `Status`/`Wait` go to
//! the node the p_uid was made on, `DestroyPool` to the node of its m_uid (ids carry their
//! node, see [`super::state::node_of`]);
//! the name registry lives on the primary (node 0), so members forward `Register`,
//! `Lookup` and `Unregister` there. [`forward`] numbers the request, remembers who asked
//! and sends [`ClusterMsg::Forward`]; the cluster thread ([`cluster_loop`]) answers
//! incoming forwards through the same `respond` as local requests and routes each
//! [`ClusterMsg::Answer`] back to its asker. A lost node fails every forward waiting on
//! it with `AgentError::NodeLost`, so no requester waits for a node that is gone.

use std::sync::atomic::Ordering;
use std::time::Duration;

use dragon_transport::TransportError;

use crate::cluster::{ClusterEvent, ClusterMsg};
use crate::proto::{AgentError, Reply, Request};

use super::serve::{answer, respond};
use super::state::{node_of, Origin};
use super::Shared;

/// How long a forward or an answer may wait for transport credit.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the cluster thread looks at the stop flag when nothing arrives.
const EVENT_SLICE: Duration = Duration::from_millis(250);

/// The node whose agent must answer `body`, when it is not this one.
pub(super) fn route(sh: &Shared, body: &Request) -> Option<u32> {
    let cluster = sh.cluster.get();
    let node = match body {
        Request::Remote { node, .. } => *node,
        Request::Status { puid } | Request::Wait { puid } | Request::Signal { puid, .. } => {
            node_of(*puid)
        }
        Request::DestroyPool { m_uid } => node_of(*m_uid),
        Request::Register { .. } | Request::Lookup { .. } | Request::Unregister { .. }
            if cluster.is_some() =>
        {
            0
        }
        _ => return None,
    };
    (node != sh.node).then_some(node)
}

/// Sends `body` to `node`'s agent for `origin`; the answer comes back through
/// [`cluster_loop`]. Returns the error reply at once when that cannot be done.
pub(super) fn forward(sh: &Shared, node: u32, body: Request, origin: Origin) -> Option<Reply> {
    let Some(cluster) = sh.cluster.get() else {
        return Some(Reply::Error(AgentError::NoSuchNode(node)));
    };
    if node as usize >= cluster.table().len() {
        return Some(Reply::Error(AgentError::NoSuchNode(node)));
    }
    if sh.lost().contains(&node) {
        return Some(Reply::Error(AgentError::NodeLost(node)));
    }
    let body = match body {
        Request::Remote { body, .. } => *body,
        b => b,
    };
    let id = sh.next_forward.fetch_add(1, Ordering::Relaxed);
    sh.forwards().insert(id, (node, origin));
    if let Err(e) = cluster.send(node, &ClusterMsg::Forward { id, body }, SEND_TIMEOUT) {
        tracing::warn!("forward to node {node} failed: {e}");
        sh.forwards().remove(&id);
        return Some(Reply::Error(match e {
            TransportError::TooLarge => {
                AgentError::BadArgument("a request too large to send to another node".into())
            }
            _ => AgentError::NodeLost(node),
        }));
    }
    None
}

/// Sends the answer to forward `id` back to `node`.
pub(super) fn answer_remote(sh: &Shared, node: u32, id: u64, body: Reply) {
    if let Some(c) = sh.cluster.get() {
        if let Err(e) = c.send(node, &ClusterMsg::Answer { id, body }, SEND_TIMEOUT) {
            tracing::warn!("answer to node {node} lost: {e}");
            if e == TransportError::TooLarge {
                // The asker still gets an answer: an error it can act on.
                let small = Reply::Error(AgentError::BadArgument(
                    "an answer too large to send to another node".into(),
                ));
                let _ = c.send(node, &ClusterMsg::Answer { id, body: small }, SEND_TIMEOUT);
            }
        }
    }
}

/// The cluster thread: answers other agents' forwards, routes their answers to ours, and
/// records shutdown and lost nodes.
pub(super) fn cluster_loop(sh: &Shared) {
    super::serve::block_all_signals();
    let Some(cluster) = sh.cluster.get() else {
        return;
    };
    while !sh.stop.load(Ordering::SeqCst) {
        match cluster.next_event(EVENT_SLICE) {
            None => {}
            Some(ClusterEvent::Shutdown) => {
                tracing::info!("the primary ends the runtime");
                sh.shutdown_requested.store(true, Ordering::SeqCst);
            }
            Some(ClusterEvent::NodeLost(n)) => node_lost(sh, n),
            Some(ClusterEvent::Message { node, msg }) => match msg {
                ClusterMsg::Forward { id, body } => {
                    let origin = Origin::Remote { node, id };
                    if let Some(reply) = respond(sh, body, origin) {
                        answer(sh, origin, reply);
                    }
                }
                ClusterMsg::Answer { id, body } => {
                    let waiting = sh.forwards().remove(&id);
                    match waiting {
                        Some((_, origin)) => answer(sh, origin, body),
                        None => tracing::debug!("late answer {id} from node {node} dropped"),
                    }
                }
                m => tracing::warn!("unexpected {m:?} from node {node}"),
            },
        }
    }
}

/// Node `n` is gone: its forwards fail, its waits are dropped, and the launcher (primary) or
/// the member's main loop learns it from [`super::Agent::lost_nodes`].
fn node_lost(sh: &Shared, n: u32) {
    tracing::warn!("node {n} was lost");
    {
        let mut lost = sh.lost();
        if !lost.contains(&n) {
            lost.push(n);
        }
    }
    let failed: Vec<Origin> = {
        let mut f = sh.forwards();
        let ids: Vec<u64> = f
            .iter()
            .filter(|(_, (node, _))| *node == n)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| f.remove(&id).map(|(_, o)| o))
            .collect()
    };
    for origin in failed {
        answer(sh, origin, Reply::Error(AgentError::NodeLost(n)));
    }
    let mut st = sh.state();
    for w in st.waiters.values_mut() {
        w.retain(|o| !matches!(o, Origin::Remote { node, .. } if *node == n));
    }
}
