//! Agent control messages (`dragon_runtime::proto`): requests and replies on the agent's
//! channels and the agents' cluster messages over the transport. Decoding mutated real
//! encodings must give a value or an error, never a panic or a crash; whatever decodes
//! re-encodes to bytes that decode to the same value (decode(encode(x)) == x for every x
//! the decoder can produce, which the mutations make arbitrary).

use dragon_fuzz::run;
use dragon_runtime::cluster::{ClusterMsg, NodeInfo};
use dragon_runtime::proto::{
    decode, encode, AgentError, Envelope, IdKind, Launch, ProcInfo, Reply, ReplyEnvelope, Request,
    StdioReq, WireRef,
};

fn node(i: u32) -> NodeInfo {
    NodeInfo {
        node: i,
        name: format!("host-n{i}"),
        hostname: "host".into(),
        ip: "10.0.0.1".into(),
        transport: "10.0.0.1:4242".into(),
        agent_pid: 1234,
        num_cpus: 8,
        physical_mem: 1 << 34,
        gpus: vec![0, 1],
        gpu_vendor: "nvidia".into(),
        objects: "10.0.0.1:555:ticket".into(),
    }
}

fn requests() -> Vec<Request> {
    let launch = Launch {
        argv: vec!["python3".into(), "-c".into(), "pass".into()],
        env: vec![("PATH".into(), "/usr/bin".into()), ("A".into(), "".into())],
        cwd: Some("/tmp".into()),
        stdin: StdioReq::Null,
        stdout: StdioReq::Fd(5),
        stderr: StdioReq::Stdout,
        cpus: vec![0, 3, 200],
        new_group: true,
        fd_map: vec![(7, 7), (9, 3)],
        name: Some("worker".into()),
    };
    vec![
        Request::Launch(launch.clone()),
        Request::Launch(Launch {
            cwd: None,
            name: None,
            stdin: StdioReq::Inherit,
            ..launch
        }),
        Request::Status { puid: 1 << 40 },
        Request::Register {
            kind: "ddict".into(),
            name: "d".into(),
            value: vec![1, 2, 3, 255],
            replace: false,
        },
        Request::Lookup {
            kind: "process".into(),
            name: "w".into(),
        },
        Request::Unregister {
            kind: "process".into(),
            name: "w".into(),
        },
        Request::NewId {
            kind: IdKind::Channel,
        },
        Request::Processes,
        Request::CreatePool { size: 1 << 30 },
        Request::DestroyPool { m_uid: 77 },
        Request::Ping,
        Request::Remote {
            node: 2,
            body: Box::new(Request::Remote {
                node: 3,
                body: Box::new(Request::Ping),
            }),
        },
        Request::Wait { puid: 5 },
        Request::Nodes,
        Request::Signal { puid: 5, sig: 15 },
    ]
}

fn replies() -> Vec<Reply> {
    vec![
        Reply::Launched { puid: 9, pid: 4321 },
        Reply::Status {
            pid: 4321,
            exit_code: Some(-9),
        },
        Reply::Done,
        Reply::Value(Some(vec![0; 40])),
        Reply::Value(None),
        Reply::Id(3),
        Reply::Processes(vec![ProcInfo {
            puid: 1,
            pid: 2,
            exit_code: None,
            name: Some("p".into()),
        }]),
        Reply::Pong(1),
        Reply::Pool {
            m_uid: 4,
            name: "/dragon-0000000000000001-0-pool-4".into(),
        },
        Reply::Nodes(vec![node(0), node(1)]),
        Reply::Error(AgentError::Os {
            what: "fork".into(),
            errno: 11,
        }),
        Reply::Error(AgentError::Exists("x".into())),
        Reply::Error(AgentError::NodeLost(3)),
    ]
}

fn reply_ref() -> WireRef {
    WireRef {
        segment: 1,
        offset: 4096,
        len: 512,
        gen: 3,
    }
}

/// Decodes `b` as `T`; when it decodes, checks the round trip of the value.
fn check<T>(b: &[u8]) -> bool
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    match decode::<T>(b) {
        Ok(v) => {
            let again = encode(&v);
            assert_eq!(decode::<T>(&again).as_ref(), Ok(&v), "round trip");
            true
        }
        Err(e) => {
            assert!(!e.is_empty());
            false
        }
    }
}

#[test]
fn fuzz_agent_requests_and_replies() {
    let mut corpus: Vec<Vec<u8>> = requests()
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            encode(&Envelope {
                seq: i as u64,
                reply: reply_ref(),
                requester: 100 + i as u32,
                body,
            })
        })
        .collect();
    corpus.extend(replies().into_iter().enumerate().map(|(i, body)| {
        encode(&ReplyEnvelope {
            seq: i as u64,
            body,
        })
    }));
    let mut decoded = 0u64;
    let n = run("proto-agent", 20_000, &corpus, |_, b| {
        decoded += check::<Envelope>(b) as u64;
        decoded += check::<ReplyEnvelope>(b) as u64;
    });
    println!("fuzz proto-agent: {decoded} of {n} inputs decoded to a message");
    assert!(decoded > 0);
}

#[test]
fn fuzz_cluster_messages() {
    let mut msgs = vec![
        ClusterMsg::Hello(node(1)),
        ClusterMsg::Table(vec![node(0), node(1), node(2)]),
        ClusterMsg::Shutdown,
    ];
    msgs.extend(
        requests()
            .into_iter()
            .enumerate()
            .map(|(i, body)| ClusterMsg::Forward { id: i as u64, body }),
    );
    msgs.extend(
        replies()
            .into_iter()
            .enumerate()
            .map(|(i, body)| ClusterMsg::Answer { id: i as u64, body }),
    );
    let corpus: Vec<Vec<u8>> = msgs.iter().map(encode).collect();
    let mut decoded = 0u64;
    let n = run("proto-cluster", 20_000, &corpus, |_, b| {
        decoded += check::<ClusterMsg>(b) as u64;
    });
    println!("fuzz proto-cluster: {decoded} of {n} inputs decoded to a message");
    assert!(decoded > 0);
}

/// Regression: `Request::Remote` holds a request, so a message of nested `Remote`s (two
/// bytes a level) made the decoder recurse once per level: a few hundred kilobytes
/// overflowed the agent's stack (SIGSEGV, the agent gone). Nesting is now bounded.
#[test]
fn regression_deeply_nested_remote_requests_are_refused_not_a_stack_overflow() {
    let remote = {
        let b = encode(&Request::Remote {
            node: 1,
            body: Box::new(Request::Ping),
        });
        let ping = encode(&Request::Ping);
        // The Remote prefix: everything before the inner Ping's bytes.
        b[1..b.len() - (ping.len() - 1)].to_vec()
    };
    let mut msg = vec![encode(&Request::Ping)[0]];
    for _ in 0..1_000_000 {
        msg.extend_from_slice(&remote);
    }
    msg.extend_from_slice(&encode(&Request::Ping)[1..]);
    let e = decode::<Request>(&msg).unwrap_err();
    assert!(e.contains("nested"), "{e}");
    let mut shallow = Request::Ping;
    for i in 0..4 {
        shallow = Request::Remote {
            node: i,
            body: Box::new(shallow),
        };
    }
    assert_eq!(decode::<Request>(&encode(&shallow)), Ok(shallow));
}
