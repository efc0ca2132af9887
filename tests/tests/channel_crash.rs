//! Senders and receivers SIGKILLed at random points of their sends and receives on one
//! shared channel never wedge it: positions a dead process reserved and never committed are
//! published once it is dead (a hole receivers skip, or a slot freed for senders), and every
//! message that arrives is whole and in order per producer.
//!
//! `DRAGON_CRASH_ROUNDS` sets the number of rounds (default 200: about 2 s; `make stress` uses
//! more). The deterministic form of each window is in `dragon-shm`'s channel unit tests.

use std::time::Duration;

use dragon_shm::channel::{Channel, ChannelError};
use dragon_shm::heap::Pool;
use dragon_shm::testing::{leftovers, test_runtime};
use dragon_shm::{SegmentKind, SegmentName};
use dragon_tests::{message, Rng, Worker};

const BIN: &str = env!("CARGO_BIN_EXE_shm-worker");

fn rounds() -> u64 {
    dragon_tests::env_count("DRAGON_CRASH_ROUNDS", 200)
}

/// The producer number of this test's own messages (victims are 1..=rounds).
const PARENT: u32 = 0;

/// Checks a received message: whole, from a known producer, in order per producer.
fn check(b: &[u8], last: &mut [Option<u64>]) -> (u32, u64) {
    assert!(b.len() >= 12, "short message of {} bytes", b.len());
    let p = u32::from_le_bytes(b[0..4].try_into().unwrap());
    let seq = u64::from_le_bytes(b[4..12].try_into().unwrap());
    assert!((p as usize) < last.len(), "unknown producer {p}");
    let mut want = Vec::new();
    message(p, seq, &mut want);
    assert!(b == &want[..], "message {p}/{seq} corrupted");
    let l = &mut last[p as usize];
    assert!(
        l.is_none_or(|l| seq > l),
        "FIFO of producer {p}: {seq} after {l:?}"
    );
    *l = Some(seq);
    (p, seq)
}

#[test]
fn killed_senders_and_receivers_never_wedge_a_shared_channel() {
    let rt = test_runtime();
    let rounds = rounds();
    {
        let pool = Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), 32 << 20).unwrap();
        let cname = SegmentName::new(rt, 0, SegmentKind::Channel, 2);
        // Four slots: the ring is often full and often empty, so victims die while blocked,
        // while reserving and while committing alike.
        let ch = Channel::create(&cname, 4, 64, Some(pool.clone())).unwrap();
        let seed = rt | 1;
        println!("seed {seed:#x}");
        let mut rng = Rng(seed);
        let nprod = (rounds + 1).to_string();
        let mut sent = 0u64;
        let mut buf = Vec::new();
        for round in 0..rounds {
            let mut producer = Worker::spawn(
                BIN,
                "chan-produce",
                &[
                    cname.to_string(),
                    (round + 1).to_string(),
                    "1000000000".into(),
                ],
            );
            let mut consumer =
                Worker::spawn(BIN, "chan-consume", &[cname.to_string(), nprod.clone()]);
            producer.wait_ready();
            consumer.wait_ready();
            // Fault injection: let them run a random while (not synchronisation), kill them
            // in a random order.
            std::thread::sleep(Duration::from_micros(rng.below(3000)));
            if rng.below(2) == 0 {
                producer.kill();
                consumer.kill();
            } else {
                consumer.kill();
                producer.kill();
            }
            // What the dead held of the pool goes back (as the node agent's sweep does), so
            // that large messages keep finding blocks.
            pool.sweep();
            // The channel keeps serving after the kills: a send finds room (a slot a dead
            // receiver held is freed), and this process can receive past whatever a dead
            // sender left (a hole).
            // (What the victims left may fill the ring: receive while the send waits.)
            message(PARENT, sent, &mut buf);
            let mut last = vec![None; rounds as usize + 1];
            let until = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                match ch.send(&buf, Some(Duration::from_millis(10))) {
                    Ok(()) => break,
                    Err(ChannelError::TimedOut) => {
                        if let Ok(m) = ch.try_recv() {
                            check(m.bytes(), &mut last);
                        }
                    }
                    Err(e) => panic!("round {round}: send failed: {e}"),
                }
                assert!(
                    std::time::Instant::now() < until,
                    "round {round}: no send for 10 s after the kills: {:?}",
                    ch.stats()
                );
            }
            sent += 1;
            loop {
                match ch.recv_with(Some(Duration::from_secs(10)), |b| check(b, &mut last)) {
                    Ok((PARENT, seq)) if seq == sent - 1 => break, // our own: all before it read
                    Ok(_) => {}
                    Err(e) => panic!("round {round}: our message did not come back: {e}"),
                }
            }
            assert_eq!(ch.try_recv().unwrap_err(), ChannelError::Empty);
        }
        // Every slot usable, over several laps.
        for seq in sent..sent + 12 {
            message(PARENT, seq, &mut buf);
            ch.try_send(&buf).unwrap();
            let mut last = vec![None; rounds as usize + 1];
            let m = ch.try_recv().expect("a message waits");
            assert_eq!(check(m.bytes(), &mut last), (PARENT, seq));
        }
        drop(ch);
        // Blocks of messages that died with their receivers are the documented leak; the
        // pool goes with the test's runtime.
        drop(pool);
    }
    assert!(leftovers(rt).is_empty());
}
