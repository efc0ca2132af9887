//! Unit tests of channels, in one process (threads stand in for peers); the
//! multi-process tests are in the `dragon-tests` crate (`tests/tests/channel_mp.rs`).

use std::time::Duration;

use super::*;

use crate::testing::{leftovers, test_runtime};
use std::sync::Arc;
use std::time::Instant;

fn setup(rt: u64, cap: u64, slot: usize) -> (Pool, Channel) {
    let pool = Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), 8 << 20).unwrap();
    let name = SegmentName::new(rt, 0, SegmentKind::Channel, 2);
    let ch = Channel::create(&name, cap, slot, Some(pool.clone())).unwrap();
    (pool, ch)
}

#[test]
fn inline_and_block_messages_fifo() {
    let rt = test_runtime();
    {
        let (pool, ch) = setup(rt, 4, 64);
        ch.send(b"hello", None).unwrap();
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        ch.send(&big, None).unwrap();
        let mut b = pool.alloc(1000).unwrap();
        b.as_mut_slice().fill(9);
        let ptr = b.as_ptr();
        ch.send_block(b, None).unwrap();
        assert_eq!(ch.len(), 3);
        match ch.recv(None).unwrap() {
            Message::Inline(v) => assert_eq!(v, b"hello"),
            m => panic!("expected inline, got {m:?}"),
        }
        match ch.recv(None).unwrap() {
            Message::Block(b) => assert_eq!(b.as_slice(), &big[..]),
            m => panic!("expected block, got {m:?}"),
        }
        match ch.recv(None).unwrap() {
            Message::Block(b) => {
                assert_eq!(b.as_ptr(), ptr, "block must move without copy");
                assert!(b.as_slice().iter().all(|&x| x == 9));
            }
            m => panic!("expected block, got {m:?}"),
        }
        assert_eq!(ch.try_recv().unwrap_err(), ChannelError::Empty);
        assert_eq!(pool.stats().blocks, 0, "received blocks freed on drop");
        pool.verify().unwrap();
    }
    assert!(leftovers(rt).is_empty());
}

#[test]
fn full_timeout_close_and_drain() {
    let rt = test_runtime();
    {
        let (pool, ch) = setup(rt, 2, 32);
        ch.try_send(&[1]).unwrap();
        ch.send(&[0u8; 500], None).unwrap();
        assert_eq!(ch.try_send(&[3]).unwrap_err(), ChannelError::Full);
        let t0 = Instant::now();
        assert_eq!(
            ch.send(&[3], Some(Duration::from_millis(30))).unwrap_err(),
            ChannelError::TimedOut
        );
        assert!(t0.elapsed() >= Duration::from_millis(30));
        let b = pool.alloc(10).unwrap();
        let e = ch
            .send_block(b, Some(Duration::from_millis(1)))
            .unwrap_err();
        assert_eq!(e.error, ChannelError::TimedOut);
        assert_eq!(e.value.len(), 10, "the unsent block comes back");
        drop(e);
        assert_eq!(pool.stats().blocks, 1, "only the queued block is live");
        let s = ch.stats();
        assert_eq!((s.capacity, s.depth, s.sent, s.received), (2, 2, 2, 0));
        ch.close();
        assert_eq!(ch.try_send(&[4]).unwrap_err(), ChannelError::Closed);
        assert_eq!(ch.recv(None).unwrap().bytes(), &[1]);
        assert_eq!(ch.recv(None).unwrap().bytes().len(), 500);
        assert_eq!(ch.recv(None).unwrap_err(), ChannelError::Closed);
        assert_eq!(pool.stats().blocks, 0);
    }
    assert!(leftovers(rt).is_empty());
}

#[test]
fn drop_of_creator_releases_queued_blocks() {
    let rt = test_runtime();
    let pool = Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), 1 << 20).unwrap();
    {
        let name = SegmentName::new(rt, 0, SegmentKind::Channel, 2);
        let ch = Channel::create(&name, 8, 32, Some(pool.clone())).unwrap();
        for _ in 0..5 {
            ch.send(&[7u8; 4000], None).unwrap();
        }
        assert_eq!(pool.stats().blocks, 5);
    }
    assert_eq!(pool.stats().blocks, 0);
    assert_eq!(pool.stats().holds, 0);
    drop(pool);
    assert!(leftovers(rt).is_empty());
}

#[test]
fn close_and_wake_all_wake_blocked_threads() {
    let rt = test_runtime();
    {
        let (_pool, ch) = setup(rt, 2, 32);
        let ch = Arc::new(ch);
        let c2 = ch.clone();
        let t = std::thread::spawn(move || c2.recv(None).map(|m| m.bytes().to_vec()));
        while ch.stats().recv_waiters == 0 {
            std::thread::yield_now();
        }
        ch.wake_all();
        assert_eq!(t.join().unwrap().unwrap_err(), ChannelError::PeerLost);
        let c2 = ch.clone();
        let t = std::thread::spawn(move || c2.recv(None).map(|m| m.bytes().to_vec()));
        while ch.stats().recv_waiters == 0 {
            std::thread::yield_now();
        }
        ch.close();
        assert_eq!(t.join().unwrap().unwrap_err(), ChannelError::Closed);
        let ch = Arc::try_unwrap(ch).unwrap();
        drop(ch);
    }
    assert!(leftovers(rt).is_empty());
}

#[test]
fn open_checks_layout_and_no_pool_is_too_large() {
    let rt = test_runtime();
    {
        let name = SegmentName::new(rt, 0, SegmentKind::Channel, 3);
        let ch = Channel::create(&name, 4, 40, None).unwrap();
        assert_eq!(
            ch.send(&[0u8; 100], None).unwrap_err(),
            ChannelError::TooLarge
        );
        let other = Channel::open(&name, None).unwrap();
        other.send(b"x", None).unwrap();
        let mut got = Vec::new();
        ch.recv_with(None, |b| got.extend_from_slice(b)).unwrap();
        assert_eq!(got, b"x");
        // A pool name opened as a channel is refused with a clear error.
        let pn = SegmentName::new(rt, 0, SegmentKind::Pool, 1);
        let _pool = Pool::create(&pn, 1 << 20).unwrap();
        let fake = SegmentName {
            kind: SegmentKind::Channel,
            ..pn
        };
        assert!(Channel::open(&fake, None).is_err());
    }
    assert!(leftovers(rt).is_empty());
}

#[test]
fn channel_in_a_pool_block() {
    let rt = test_runtime();
    {
        let pool = Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), 4 << 20).unwrap();
        let before = pool.stats().blocks;
        let ch = Channel::create_in(&pool, 4, 48).unwrap();
        assert!(ch.name().is_none());
        let r = ch.block_ref().unwrap();
        assert_eq!(pool.stats().blocks, before + 1);
        // Another handle attaches through the BlockRef (as another process would).
        // SAFETY: the channel never lends its block mutably.
        let other = Channel::attach(unsafe { pool.block(r) }.unwrap()).unwrap();
        ch.send(b"small", None).unwrap();
        ch.send(&vec![5u8; 10_000], None).unwrap();
        assert_eq!(other.recv(None).unwrap().bytes(), b"small");
        match other.recv(None).unwrap() {
            Message::Block(b) => assert!(b.as_slice().iter().all(|&x| x == 5)),
            m => panic!("expected a block, got {m:?}"),
        }
        assert_eq!(other.stats().received, 2);
        ch.send(&vec![6u8; 10_000], None).unwrap(); // left undelivered
        drop(other);
        drop(ch); // creator: closes, drains (frees the undelivered block), drops its hold
        assert_eq!(
            pool.stats().blocks,
            before,
            "ring block and messages all freed"
        );
        assert_eq!(pool.stats().holds, 0);
        // A block that is not a channel is refused.
        let junk = pool.alloc_zeroed(4096).unwrap();
        assert_eq!(
            Channel::attach(junk).unwrap_err(),
            ChannelError::Segment(SegmentError::BadMagic)
        );
    }
    assert!(leftovers(rt).is_empty());
}

/// A sender killed between reserving its position and committing it: receivers skip the
/// position once its owner is dead (a hole), and get every message behind it, in order.
#[test]
fn a_sender_dead_between_reserve_and_commit_leaves_a_hole_receivers_skip() {
    let rt = test_runtime();
    {
        let (_pool, ch) = setup(rt, 4, 64);
        crate::fault::crash_child_at("channel.send.reserved", || {
            let _ = ch.send(b"lost", None);
        });
        ch.send(b"one", None).unwrap();
        let mut b = ch.pool().unwrap().alloc(1000).unwrap();
        b.as_mut_slice().fill(7);
        ch.send_block(b, None).unwrap();
        // The first look only notes the stuck position; a try after the grace publishes it.
        assert_eq!(ch.try_recv().unwrap_err(), ChannelError::Empty);
        match ch.recv(Some(Duration::from_secs(5))).unwrap() {
            Message::Inline(v) => assert_eq!(v, b"one"),
            m => panic!("expected inline, got {m:?}"),
        }
        match ch.recv(Some(Duration::from_secs(5))).unwrap() {
            Message::Block(b) => assert!(b.as_slice().iter().all(|&x| x == 7)),
            m => panic!("expected block, got {m:?}"),
        }
        assert_eq!(ch.try_recv().unwrap_err(), ChannelError::Empty);
        // The ring goes on: every slot is usable again, over more than one lap.
        for lap in 0..3u8 {
            for i in 0..4u8 {
                ch.try_send(&[lap, i]).unwrap();
            }
            for i in 0..4u8 {
                assert_eq!(ch.try_recv().unwrap().bytes(), &[lap, i]);
            }
        }
    }
    assert!(leftovers(rt).is_empty());
}

/// A sender that is alive but stopped between reserving and committing (a slow party) keeps
/// its position: receivers wait for it and never publish it; once it is dead, they do.
#[test]
fn a_live_sender_holding_a_position_is_waited_for_not_skipped() {
    let rt = test_runtime();
    {
        let (_pool, ch) = setup(rt, 4, 64);
        let child = crate::fault::stop_child_at("channel.send.reserved", || {
            let _ = ch.send(b"slow", None);
        });
        ch.send(b"behind", None).unwrap();
        let s = ch.stats();
        assert_eq!((s.mid_operation, s.uncommitted_send), (1, Some(0)), "{s:?}");
        let t = Instant::now();
        assert_eq!(
            ch.recv(Some(Duration::from_millis(200))).unwrap_err(),
            ChannelError::TimedOut,
            "a live sender's position was skipped"
        );
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert_eq!(ch.try_recv().unwrap_err(), ChannelError::Empty);
        crate::fault::kill_and_reap(child);
        assert_eq!(
            ch.recv(Some(Duration::from_secs(5))).unwrap().bytes(),
            b"behind"
        );
        let s = ch.stats();
        // The dead sender's entry stays until a claim takes it over; its position is gone.
        assert_eq!((s.depth, s.uncommitted_send), (0, None), "{s:?}");
    }
    assert!(leftovers(rt).is_empty());
}

/// A receiver killed between reserving a message and committing its slot: the message goes
/// with it (as if received), and senders get the slot back once the receiver is dead,
/// instead of seeing the ring full at that slot forever.
#[test]
fn a_receiver_dead_between_reserve_and_commit_frees_its_slot_for_senders() {
    let rt = test_runtime();
    {
        let (_pool, ch) = setup(rt, 2, 64);
        ch.send(b"taken", None).unwrap();
        ch.send(b"kept", None).unwrap();
        crate::fault::crash_child_at("channel.recv.reserved", || {
            let _ = ch.recv(None);
        });
        assert_eq!(ch.stats().uncommitted_recv, Some(0));
        assert_eq!(ch.try_send(b"x").unwrap_err(), ChannelError::Full);
        // A blocked send is woken by no one here: its capped sleeps look again.
        ch.send(b"new", Some(Duration::from_secs(5))).unwrap();
        assert_eq!(ch.try_recv().unwrap().bytes(), b"kept");
        assert_eq!(ch.try_recv().unwrap().bytes(), b"new");
        assert_eq!(ch.try_recv().unwrap_err(), ChannelError::Empty);
    }
    assert!(leftovers(rt).is_empty());
}

/// A receiver blocked on an empty ring is woken by a later sender's commit even while an
/// earlier position belongs to a dead sender, and gets the later message.
#[test]
fn a_blocked_receiver_gets_the_message_behind_a_dead_senders_position() {
    let rt = test_runtime();
    {
        let (_pool, ch) = setup(rt, 4, 64);
        let ch = Arc::new(ch);
        crate::fault::crash_child_at("channel.send.reserved", || {
            let _ = ch.send(b"lost", None);
        });
        let c2 = ch.clone();
        let rx = std::thread::spawn(move || c2.recv(Some(Duration::from_secs(10))));
        ch.send(b"after", None).unwrap();
        assert_eq!(rx.join().unwrap().unwrap().bytes(), b"after");
    }
    assert!(leftovers(rt).is_empty());
}

/// A receiver that is alive but stopped between reserving a message and committing its slot
/// keeps the slot: senders wait for it and never free it; once it is dead, they do.
#[test]
fn a_live_receiver_holding_a_slot_is_waited_for_not_freed() {
    let rt = test_runtime();
    {
        let (_pool, ch) = setup(rt, 1, 64);
        ch.send(b"held", None).unwrap();
        let child = crate::fault::stop_child_at("channel.recv.reserved", || {
            let _ = ch.recv(None);
        });
        assert_eq!(
            ch.send(b"next", Some(Duration::from_millis(200)))
                .unwrap_err(),
            ChannelError::TimedOut,
            "a live receiver's slot was freed"
        );
        crate::fault::kill_and_reap(child);
        ch.send(b"next", Some(Duration::from_secs(5))).unwrap();
        assert_eq!(ch.try_recv().unwrap().bytes(), b"next");
    }
    assert!(leftovers(rt).is_empty());
}

/// A sender asleep on a full ring before the receiver that could free it died is not left
/// asleep: a receiver that then finds the ring empty frees the dead receiver's slot and
/// wakes it (nobody else would: no receive commits).
#[test]
fn a_sender_asleep_behind_a_dead_receivers_slot_is_freed_by_the_next_receiver() {
    let rt = test_runtime();
    {
        let (_pool, ch) = setup(rt, 1, 64);
        let ch = Arc::new(ch);
        ch.send(b"a", None).unwrap();
        let c2 = ch.clone();
        let tx = std::thread::spawn(move || c2.send(b"b", Some(Duration::from_secs(20))));
        // Until the sender announced itself asleep (an observed state, not a delay).
        while ch.stats().send_waiters == 0 {
            std::thread::yield_now();
        }
        crate::fault::crash_child_at("channel.recv.reserved", || {
            let _ = ch.recv(None);
        });
        assert_eq!(
            ch.recv(Some(Duration::from_secs(10))).unwrap().bytes(),
            b"b"
        );
        tx.join().unwrap().unwrap();
    }
    assert!(leftovers(rt).is_empty());
}

/// A reader that panics while it reads a received slot in place gives the slot (and its
/// announcement) back: the channel goes on.
#[test]
fn a_panicking_reader_gives_its_slot_back() {
    let rt = test_runtime();
    {
        let (_pool, ch) = setup(rt, 1, 64);
        ch.send(b"x", None).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ch.recv_with(None, |_| panic!("reader failed"))
        }));
        assert!(r.is_err());
        ch.try_send(b"y").unwrap();
        assert_eq!(ch.try_recv().unwrap().bytes(), b"y");
    }
    assert!(leftovers(rt).is_empty());
}
