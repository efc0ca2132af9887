//! The agent and its client with real processes.

use super::*;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::proto::{IdKind, Reply, Request, StdioReq};
use crate::spawn::pidfd_open;
use dragon_shm::platform::random_u64;

fn launch_req(argv: &[&str]) -> Launch {
    Launch {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: std::env::vars().collect(),
        cwd: None,
        stdin: StdioReq::Null,
        stdout: StdioReq::Null,
        stderr: StdioReq::Null,
        cpus: vec![],
        new_group: true,
        fd_map: vec![],
        name: None,
    }
}

/// A fresh channel id from the agent behind `c`.
fn channel_id(c: &AgentClient) -> u64 {
    let req = Request::NewId {
        kind: IdKind::Channel,
    };
    match c.call(req, None).unwrap() {
        Reply::Id(i) => i,
        r => panic!("unexpected {r:?}"),
    }
}

fn wait_code(c: &AgentClient, puid: u64) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.call(Request::Status { puid }, None).unwrap() {
            Reply::Status {
                exit_code: Some(x), ..
            } => return x,
            Reply::Status { pid, .. } => {
                assert!(Instant::now() < deadline, "pid {pid} did not end");
                let fd = pidfd_open(pid).unwrap();
                let mut p = [nix::poll::PollFd::new(
                    std::os::fd::AsFd::as_fd(&fd),
                    nix::poll::PollFlags::POLLIN,
                )];
                let _ = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(1000u16));
            }
            r => panic!("unexpected {r:?}"),
        }
    }
}

#[test]
fn launch_status_registry_ids_and_agent_death() {
    let rt = random_u64();
    let mut agent = Agent::start(rt, 0, 8 << 20).unwrap();
    let c = client_of(&agent, rt, 0);

    // Launch through the channel; exit codes and signals come back.
    let Reply::Launched { puid, pid } = c
        .call(Request::Launch(launch_req(&["sh", "-c", "exit 7"])), None)
        .unwrap()
    else {
        panic!()
    };
    assert!(puid > ID_BASE && pid > 0);
    assert_eq!(wait_code(&c, puid), 7);
    let mut l = launch_req(&["sleep", "30"]);
    l.name = Some("sleeper".into());
    let Reply::Launched {
        puid: p2,
        pid: pid2,
    } = c.call(Request::Launch(l), None).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        c.call(
            Request::Lookup {
                kind: "process".into(),
                name: "sleeper".into()
            },
            None
        )
        .unwrap(),
        Reply::Value(Some(p2.to_le_bytes().to_vec()))
    );
    nix::sys::signal::kill(Pid::from_raw(pid2), nix::sys::signal::SIGKILL).unwrap();
    assert_eq!(wait_code(&c, p2), -9);

    // Errors are typed.
    match c.call(Request::Launch(launch_req(&["/no/such/prog"])), None) {
        Err(ClientError::Agent(AgentError::NotFound(_))) => {}
        r => panic!("unexpected {r:?}"),
    }
    match c.call(Request::Status { puid: 1 }, None) {
        Err(ClientError::Agent(AgentError::NoSuchProcess(1))) => {}
        r => panic!("unexpected {r:?}"),
    }
    let reg = |replace| Request::Register {
        kind: "ddict".into(),
        name: "d".into(),
        value: vec![1, 2],
        replace,
    };
    assert_eq!(c.call(reg(false), None).unwrap(), Reply::Done);
    assert!(matches!(
        c.call(reg(false), None),
        Err(ClientError::Agent(AgentError::Exists(_)))
    ));
    assert_eq!(c.call(reg(true), None).unwrap(), Reply::Done);
    let a = channel_id(&c);
    let b = channel_id(&c);
    assert_eq!(b, a + 1);
    let Reply::Processes(ps) = c.call(Request::Processes, None).unwrap() else {
        panic!()
    };
    assert_eq!(ps.len(), 2);
    assert_eq!(ps[1].name.as_deref(), Some("sleeper"));

    // A stopped agent: requests fail instead of hanging.
    agent.stop();
    match c.call(Request::Ping, Some(Duration::from_secs(2))) {
        Err(ClientError::AgentGone) | Err(ClientError::TimedOut) => {}
        r => panic!("unexpected {r:?}"),
    }
    drop(c);
    drop(agent);
    assert!(dragon_shm::testing::leftovers(rt).is_empty());
}

fn node_info(node: u32) -> NodeInfo {
    NodeInfo {
        node,
        name: format!("n{node}"),
        hostname: "host".into(),
        ip: "127.0.0.1".into(),
        transport: String::new(),
        agent_pid: std::process::id(),
        num_cpus: 1,
        physical_mem: 1 << 30,
        gpus: vec![],
        gpu_vendor: String::new(),
        objects: String::new(),
    }
}

#[test]
fn many_waits_on_one_connection_come_back_as_processes_end() {
    let rt = random_u64();
    let mut agent = Agent::start(rt, 0, 8 << 20).unwrap();
    let (pool, chan) = link_of(&agent, rt, 0);
    let c = AgentClient::connect(pool.clone(), chan).unwrap();
    let w = AgentWaits::connect(pool, chan).unwrap();
    let mut want = std::collections::HashMap::new();
    let mut sleeper = None;
    for k in 0..8 {
        let argv = if k == 0 {
            vec!["sleep".to_string(), "30".to_string()]
        } else {
            vec!["sh".into(), "-c".into(), format!("exit {k}")]
        };
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let Reply::Launched { puid, pid } =
            c.call(Request::Launch(launch_req(&argv)), None).unwrap()
        else {
            panic!()
        };
        w.add(puid).unwrap();
        want.insert(puid, if k == 0 { -9 } else { k });
        if k == 0 {
            sleeper = Some((puid, pid));
        }
    }
    // An unknown process is answered at once, with the agent's error.
    w.add(1).unwrap();
    assert_eq!(w.pending(), 9);
    let (sleeper, pid) = sleeper.unwrap();
    let mut got = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < 9 {
        assert!(Instant::now() < deadline, "ends missing: {got:?}");
        for (puid, r) in w.ended(Duration::from_millis(250)).unwrap() {
            got.insert(puid, r);
        }
        // The sleeper ends only when killed, after every other answer came.
        if got.len() == 8 && !got.contains_key(&sleeper) {
            nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
        }
    }
    assert!(matches!(
        got.remove(&1),
        Some(Err(AgentError::NoSuchProcess(1)))
    ));
    for (puid, code) in want {
        assert_eq!(got[&puid], Ok(code), "p_uid {puid}");
    }
    assert_eq!(w.pending(), 0);
    assert!(w.ended(Duration::from_millis(10)).unwrap().is_empty());

    // A stopped agent: the reader returns (the agent's process, this one, still runs, so
    // it cannot say AgentGone here; py/tests kill agent processes).
    agent.stop();
    match w.ended(Duration::from_millis(500)) {
        Err(ClientError::AgentGone) => {}
        Ok(v) if v.is_empty() => {}
        r => panic!("unexpected {r:?}"),
    }
    drop((c, w));
    drop(agent);
    assert!(dragon_shm::testing::leftovers(rt).is_empty());
}

/// The node pool and request channel a process of `agent`'s node connects through.
fn link_of(agent: &Agent, rt: u64, node: u32) -> (Pool, BlockRef) {
    let env = agent.env_value();
    let chan = parse_ref(env.rsplit(':').next().unwrap()).unwrap();
    let pool = Pool::open(&SegmentName::new(rt, node, SegmentKind::Pool, 1)).unwrap();
    (pool, chan)
}

fn client_of(agent: &Agent, rt: u64, node: u32) -> AgentClient {
    let (pool, chan) = link_of(agent, rt, node);
    AgentClient::connect(pool, chan).unwrap()
}

/// Two agents of one runtime in this process (launches and waits are tested with separate
/// agent processes in py/tests: two agents in one process would reap each other's children).
#[test]
fn two_agents_forward_requests_and_report_a_lost_node() {
    let rt = random_u64();
    let secret = Secret::random();
    let mut a0 = Agent::start(rt, 0, 8 << 20).unwrap();
    let a1 = Agent::start(rt, 1, 8 << 20).unwrap();
    a0.open_endpoint("tcp", secret.clone(), "127.0.0.1:0")
        .unwrap();
    let addr1 = a1.open_endpoint("tcp", secret, "127.0.0.1:0").unwrap();
    let t = Duration::from_secs(10);
    let joined = std::thread::spawn(move || {
        a1.join_cluster(node_info(1), t).unwrap();
        a1
    });
    let peer = PeerAddr {
        node: NodeId(1),
        addr: addr1,
    };
    a0.start_primary(node_info(0), &[peer], t).unwrap();
    let mut a1 = joined.join().unwrap();
    let c0 = client_of(&a0, rt, 0);
    let c1 = client_of(&a1, rt, 1);

    // Both know both nodes.
    let Reply::Nodes(nodes) = c1.call(Request::Nodes, None).unwrap() else {
        panic!("no table")
    };
    assert_eq!(
        nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["n0", "n1"]
    );
    assert_eq!(a0.nodes(), nodes);
    // A request for node 0 from node 1 is answered by node 0's agent (its pid is ours here,
    // so check the route through ids instead: node 1 makes ids that name node 1).
    let remote_ping = Request::Remote {
        node: 0,
        body: Box::new(Request::Ping),
    };
    assert_eq!(
        c1.call(remote_ping, None).unwrap(),
        Reply::Pong(std::process::id())
    );
    let id1 = channel_id(&c1);
    let id0 = channel_id(&c0);
    assert_eq!((node_of(id0), node_of(id1)), (0, 1));
    // The registry is the primary's: registered from node 1, found from node 0.
    let reg = Request::Register {
        kind: "queue".into(),
        name: "q".into(),
        value: vec![7],
        replace: false,
    };
    assert_eq!(c1.call(reg, None).unwrap(), Reply::Done);
    let look = Request::Lookup {
        kind: "queue".into(),
        name: "q".into(),
    };
    assert_eq!(c0.call(look, None).unwrap(), Reply::Value(Some(vec![7])));
    // Descriptors do not travel to another node; unknown nodes are named.
    let mut l = launch_req(&["true"]);
    l.stdout = StdioReq::Fd(1);
    let far = Request::Remote {
        node: 0,
        body: Box::new(Request::Launch(l)),
    };
    assert!(matches!(
        c1.call(far, None),
        Err(ClientError::Agent(AgentError::BadArgument(_)))
    ));
    let nowhere = Request::Remote {
        node: 5,
        body: Box::new(Request::Ping),
    };
    assert!(matches!(
        c1.call(nowhere, None),
        Err(ClientError::Agent(AgentError::NoSuchNode(5)))
    ));
    // A status of a p_uid made on node 1 goes to node 1.
    let ghost = ID_BASE + (1 << NODE_SHIFT) + 999;
    assert!(matches!(
        c0.call(Request::Status { puid: ghost }, None),
        Err(ClientError::Agent(AgentError::NoSuchProcess(p))) if p == ghost
    ));

    // Node 1's agent stops: node 0 learns it, and requests for node 1 fail with its name.
    a1.stop();
    let to_1 = || Request::Remote {
        node: 1,
        body: Box::new(Request::Ping),
    };
    assert!(matches!(
        c0.call(to_1(), Some(Duration::from_secs(10))),
        Err(ClientError::Agent(AgentError::NodeLost(1)))
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while a0.lost_nodes() != [1] {
        assert!(Instant::now() < deadline, "node 1 not reported lost");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(matches!(
        c0.call(to_1(), None),
        Err(ClientError::Agent(AgentError::NodeLost(1)))
    ));
    drop((c0, c1));
    a0.stop();
    drop((a0, a1));
    assert!(dragon_shm::testing::leftovers(rt).is_empty());
}
