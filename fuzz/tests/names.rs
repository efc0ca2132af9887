//! Names and references read from text another process wrote: segment names listed in
//! `/dev/shm` (`SegmentName::parse`, what `dragon-shm ls` and the Python layer parse) and the
//! agent channel references of `DRAGON_RUNTIME` (`agent::parse_ref`). Any text gives a value
//! or `None`/an error, never a panic; formatting round-trips.

use dragon_fuzz::{run, Rng};
use dragon_runtime::agent::{format_ref, parse_ref};
use dragon_shm::heap::BlockRef;
use dragon_shm::{SegmentKind, SegmentName};

fn random_name(rng: &mut Rng) -> SegmentName {
    let kind = *rng.pick(&[SegmentKind::Pool, SegmentKind::Channel, SegmentKind::Raw]);
    SegmentName::new(
        rng.interesting(),
        rng.interesting() as u32,
        kind,
        rng.interesting(),
    )
}

fn random_ref(rng: &mut Rng) -> BlockRef {
    BlockRef {
        segment: rng.interesting(),
        offset: rng.interesting(),
        len: rng.interesting(),
        gen: rng.interesting() as u32,
        _pad: 0,
    }
}

#[test]
fn fuzz_segment_names_and_agent_refs() {
    let mut seed = Rng::new(4);
    let mut corpus: Vec<Vec<u8>> = (0..8)
        .map(|_| random_name(&mut seed).to_string().into_bytes())
        .collect();
    corpus.extend((0..8).map(|_| format_ref(random_ref(&mut seed)).into_bytes()));
    let mut parsed = 0u64;
    run("names", 50_000, &corpus, |rng, b| {
        let s = String::from_utf8_lossy(b);
        if let Ok(n) = SegmentName::parse(&s) {
            parsed += 1;
            assert_eq!(SegmentName::parse(&n.to_string()), Ok(n));
            assert_eq!(SegmentName::parse(&n.file_name()), Ok(n));
        }
        if let Some(r) = parse_ref(&s) {
            parsed += 1;
            assert_eq!(parse_ref(&format_ref(r)), Some(r));
        }
        let n = random_name(rng);
        assert_eq!(SegmentName::parse(&n.os_name()), Ok(n));
        let r = random_ref(rng);
        assert_eq!(parse_ref(&format_ref(r)), Some(r));
    });
    assert!(parsed > 0);
}
