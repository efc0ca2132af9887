//! Channels across real processes: many producers and consumers, mixed inline and block
//! payloads, no loss, no duplicate, FIFO per producer; blocked processes sleep.
//!
//! `DRAGON_CHAN_MSGS` sets the total message count (default 1,000,000).

use std::time::{Duration, Instant};

use dragon_shm::channel::Channel;
use dragon_shm::heap::Pool;
use dragon_shm::testing::{leftovers, test_runtime};
use dragon_shm::{SegmentKind, SegmentName};
use dragon_tests::{cpu_time, message_hash, Worker};

const BIN: &str = env!("CARGO_BIN_EXE_shm-worker");

fn total() -> u64 {
    dragon_tests::env_count("DRAGON_CHAN_MSGS", 1_000_000)
}

#[test]
fn four_producers_four_consumers_no_loss_no_dup_fifo() {
    many_to_many(false);
}

#[test]
fn same_through_a_channel_in_a_pool_block() {
    many_to_many(true);
}

fn many_to_many(in_block: bool) {
    const P: u64 = 4;
    const C: usize = 4;
    let per = total() / P;
    let rt = test_runtime();
    {
        let pool = Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), 64 << 20).unwrap();
        let cname = SegmentName::new(rt, 0, SegmentKind::Channel, 2);
        let ch = if in_block {
            Channel::create_in(&pool, 256, 64).unwrap()
        } else {
            Channel::create(&cname, 256, 64, Some(pool.clone())).unwrap()
        };
        let spec = dragon_tests::channel_spec(&ch, &pool);
        let mut consumers: Vec<Worker> = (0..C)
            .map(|_| Worker::spawn(BIN, "chan-consume", &[spec.clone(), P.to_string()]))
            .collect();
        for w in &mut consumers {
            w.wait_ready();
        }
        let t0 = Instant::now();
        let mut producers: Vec<Worker> = (0..P)
            .map(|p| {
                Worker::spawn(
                    BIN,
                    "chan-produce",
                    &[spec.clone(), p.to_string(), per.to_string()],
                )
            })
            .collect();
        for w in &mut producers {
            w.wait_ready();
        }
        for w in producers {
            let (code, lines) = w.finish();
            assert_eq!(code, 0, "producer failed: {lines:?}");
        }
        ch.close();
        let mut count = [0u64; P as usize];
        let mut sum = [0u64; P as usize];
        for w in consumers {
            let (code, lines) = w.finish();
            assert_eq!(code, 0, "consumer failed (see its stderr): {lines:?}");
            for l in lines {
                let f: Vec<&str> = l.split(' ').collect();
                assert_eq!(f[0], "got", "unexpected line {l}");
                let p: usize = f[1].parse().unwrap();
                count[p] += f[2].parse::<u64>().unwrap();
                sum[p] = sum[p].wrapping_add(f[3].parse::<u64>().unwrap());
            }
        }
        let dt = t0.elapsed();
        println!("{} messages through {P}x{C} processes in {dt:?}", P * per);
        for p in 0..P {
            let want = (0..per).fold(0u64, |a, s| a.wrapping_add(message_hash(p as u32, s)));
            assert_eq!(
                count[p as usize], per,
                "producer {p}: lost or duplicated messages"
            );
            assert_eq!(sum[p as usize], want, "producer {p}: wrong set of messages");
        }
        let s = ch.stats();
        assert_eq!((s.sent, s.received, s.depth), (P * per, P * per, 0));
        drop(ch);
        assert_eq!(
            pool.stats().blocks,
            0,
            "every block message was freed by its consumer"
        );
        assert_eq!(pool.stats().holds, 0);
        pool.verify().unwrap();
    }
    assert!(
        leftovers(rt).is_empty(),
        "segments left: {:?}",
        leftovers(rt)
    );
}

#[test]
fn blocked_receiver_sleeps_and_close_wakes_it() {
    let rt = test_runtime();
    {
        let cname = SegmentName::new(rt, 0, SegmentKind::Channel, 2);
        let ch = Channel::create(&cname, 4, 64, None).unwrap();
        let mut w = Worker::spawn(BIN, "chan-consume", &[cname.to_string(), "1".into()]);
        w.wait_ready();
        // Wait until it sleeps on the channel, then measure it over two seconds.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ch.stats().recv_waiters == 0 {
            assert!(Instant::now() < deadline, "consumer never blocked");
            std::thread::yield_now();
        }
        let pid = w.child.id();
        let (c0, t0) = (cpu_time(pid), Instant::now());
        std::thread::sleep(Duration::from_secs(2)); // the measurement window, not a sync
        let (c1, t1) = (cpu_time(pid), Instant::now());
        let share = (c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64();
        println!("blocked receiver used {:.2}% of a CPU", share * 100.0);
        assert!(
            share < 0.05,
            "blocked receiver used {:.1}% CPU",
            share * 100.0
        );
        ch.send(&dragon_tests_msg(), None).unwrap();
        ch.close();
        let (code, lines) = w.finish();
        assert_eq!(code, 0);
        assert_eq!(lines, vec![format!("got 0 1 {}", message_hash(0, 0))]);
    }
    assert!(leftovers(rt).is_empty());
}

fn dragon_tests_msg() -> Vec<u8> {
    let mut b = Vec::new();
    dragon_tests::message(0, 0, &mut b);
    b
}

#[test]
fn killed_blocked_sender_leaves_channel_usable() {
    let rt = test_runtime();
    {
        let pool = Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), 8 << 20).unwrap();
        let cname = SegmentName::new(rt, 0, SegmentKind::Channel, 2);
        let ch = Channel::create(&cname, 2, 64, Some(pool.clone())).unwrap();
        // A producer with more messages than the ring holds blocks once it is full.
        let mut w = Worker::spawn(
            BIN,
            "chan-produce",
            &[cname.to_string(), "0".into(), "100".into()],
        );
        w.wait_ready();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ch.stats().send_waiters == 0 {
            assert!(Instant::now() < deadline, "producer never blocked");
            std::thread::yield_now();
        }
        w.kill();
        pool.sweep();
        // What it committed is intact and in order; the channel still works both ways.
        let mut want = Vec::new();
        for seq in 0..2 {
            let m = ch.recv(Some(Duration::from_secs(5))).unwrap();
            dragon_tests::message(0, seq, &mut want);
            assert_eq!(m.bytes(), &want[..]);
        }
        ch.send(b"after", None).unwrap();
        assert_eq!(ch.recv(None).unwrap().bytes(), b"after");
        drop(ch);
        assert_eq!(pool.stats().blocks, 0);
    }
    assert!(leftovers(rt).is_empty());
}
