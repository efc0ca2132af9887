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
    let env = agent.env_value();
    let chan = parse_ref(env.rsplit(':').next().unwrap()).unwrap();
    let pool = Pool::open(&SegmentName::new(rt, 0, SegmentKind::Pool, 1)).unwrap();
    let c = AgentClient::connect(pool, chan).unwrap();

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
    let Reply::Id(a) = c
        .call(
            Request::NewId {
                kind: IdKind::Channel,
            },
            None,
        )
        .unwrap()
    else {
        panic!()
    };
    let Reply::Id(b) = c
        .call(
            Request::NewId {
                kind: IdKind::Channel,
            },
            None,
        )
        .unwrap()
    else {
        panic!()
    };
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
