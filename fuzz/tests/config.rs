//! The user's `dragon-config` file (JSON, or the old `key=value` lines): any bytes in the
//! file give a configuration or an error, never a panic; a configuration survives its file
//! text (from_json(to_json(c)) == c) and `get` answers for every key.

use dragon_fuzz::{run, Rng};
use dragon_transport::config::DragonConfig;

fn random_config(rng: &mut Rng) -> DragonConfig {
    let mut c = DragonConfig::default();
    let words = [
        "ofi_provider",
        "ofi_runtime_lib",
        "",
        "é",
        "a=b",
        "\"",
        "\\",
        "\n",
        "#x",
        "tcp;ofi_rxm",
    ];
    for _ in 0..rng.below(5) {
        let k: String = (0..1 + rng.below(3)).map(|_| *rng.pick(&words)).collect();
        let v: String = (0..rng.below(3)).map(|_| *rng.pick(&words)).collect();
        c.set(&k, &v);
    }
    c
}

#[test]
fn fuzz_dragon_config_file() {
    let mut seed = Rng::new(3);
    let mut corpus: Vec<Vec<u8>> = vec![
        br#"{"ofi_provider": "tcp;ofi_rxm", "ofi_runtime_lib": ["", "/usr/lib64"]}"#.to_vec(),
        br#"{"ofi_runtime_lib": "/opt/lib", "other": {"n": [1, 2.5, null, true]}}"#.to_vec(),
        b"# old format\nofi-runtime-lib=/usr/lib\n\nofi-provider = verbs;ofi_rxm\n".to_vec(),
        b"[]".to_vec(),
    ];
    corpus.extend((0..6).map(|_| random_config(&mut seed).to_json().into_bytes()));
    let dir = std::env::temp_dir().join(format!("dragon-fuzz-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dragon-config.json");
    let mut parsed = 0u64;
    let n = run("config-file", 5_000, &corpus, |rng, b| {
        let text = String::from_utf8_lossy(b);
        for c in [
            DragonConfig::from_json(&text).ok(),
            DragonConfig::from_legacy(&text),
        ]
        .into_iter()
        .flatten()
        {
            parsed += 1;
            for k in c.entries().keys() {
                let _ = c.get(k);
            }
            assert_eq!(DragonConfig::from_json(&c.to_json()).as_ref(), Ok(&c));
        }
        let c = random_config(rng);
        assert_eq!(DragonConfig::from_json(&c.to_json()).as_ref(), Ok(&c));
        // The raw bytes (not always UTF-8) as the file itself, one input in 16 (it writes).
        if rng.one_in(16) {
            std::fs::write(&path, b).unwrap();
            if let Ok(c) = DragonConfig::load(&path) {
                assert_eq!(DragonConfig::from_json(&c.to_json()).as_ref(), Ok(&c));
            }
        }
    });
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(parsed > 0 && n > 0);
}
