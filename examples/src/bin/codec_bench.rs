//! Compares serde codecs on a realistic cached entity: encode + decode time and encoded size.
//!
//! Run with `cargo run --release -p examples --bin codec_bench`; prints a table and writes
//! `target/codec_bench.json`. The cache uses the codec this measurement chose (see `cache_runtime::codec`).

use examples::Report;
use std::hint::black_box;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A product row as a shop would cache it, including a JSONB-like attribute map and optional fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    id: i64,
    category_id: i64,
    sku: String,
    name: String,
    description: Option<String>,
    price_cents: i64,
    currency: String,
    in_stock: bool,
    tags: Vec<String>,
    rating: f64,
    created_at_unix: i64,
    updated_at_unix: i64,
}

fn product(i: i64) -> Product {
    Product {
        id: 123_456 + i,
        category_id: 42,
        sku: format!("SKU-{:08}", 123_456 + i),
        name: "Ergonomic aluminium desk lamp, warm white".to_owned(),
        description: Some(
            "A dimmable LED desk lamp with an adjustable arm, a weighted base and a USB-C port. \
             Ships with a two-year warranty."
                .to_owned(),
        ),
        price_cents: 4_999,
        currency: "EUR".to_owned(),
        in_stock: true,
        tags: vec!["lighting".into(), "office".into(), "led".into()],
        rating: 4.6,
        created_at_unix: 1_700_000_000,
        updated_at_unix: 1_730_000_000 + i,
    }
}

/// A row with a JSONB column: needs `deserialize_any`, which only self-describing formats offer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WithJsonb {
    id: i64,
    attributes: serde_json::Value,
}

/// Whether each codec round-trips a row with a JSONB column.
fn jsonb_support() -> Vec<(&'static str, bool)> {
    let row = WithJsonb {
        id: 1,
        attributes: serde_json::json!({"color": "white", "watts": 9, "dimmable": true}),
    };
    let ok = |r: Option<WithJsonb>| r.as_ref() == Some(&row);
    vec![
        (
            "serde_json",
            ok(serde_json::to_vec(&row)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())),
        ),
        (
            "bincode2",
            ok(
                bincode::serde::encode_to_vec(&row, bincode::config::standard())
                    .ok()
                    .and_then(|b| {
                        bincode::serde::decode_from_slice(&b, bincode::config::standard())
                            .ok()
                            .map(|(r, _)| r)
                    }),
            ),
        ),
        (
            "postcard",
            ok(postcard::to_allocvec(&row)
                .ok()
                .and_then(|b| postcard::from_bytes(&b).ok())),
        ),
        (
            "rmp-serde",
            ok(rmp_serde::to_vec(&row)
                .ok()
                .and_then(|b| rmp_serde::from_slice(&b).ok())),
        ),
        (
            "rmp-serde(named)",
            ok(rmp_serde::to_vec_named(&row)
                .ok()
                .and_then(|b| rmp_serde::from_slice(&b).ok())),
        ),
    ]
}

type Enc = fn(&Product) -> Vec<u8>;
type Dec = fn(&[u8]) -> Product;

#[allow(clippy::unwrap_used)] // a benchmark: a codec failure is a bug to see at once
fn codecs() -> Vec<(&'static str, Enc, Dec)> {
    vec![
        (
            "serde_json",
            |p| serde_json::to_vec(p).unwrap(),
            |b| serde_json::from_slice(b).unwrap(),
        ),
        (
            "bincode2",
            |p| bincode::serde::encode_to_vec(p, bincode::config::standard()).unwrap(),
            |b| {
                bincode::serde::decode_from_slice(b, bincode::config::standard())
                    .unwrap()
                    .0
            },
        ),
        (
            "postcard",
            |p| postcard::to_allocvec(p).unwrap(),
            |b| postcard::from_bytes(b).unwrap(),
        ),
        (
            "rmp-serde",
            |p| rmp_serde::to_vec(p).unwrap(),
            |b| rmp_serde::from_slice(b).unwrap(),
        ),
        (
            "rmp-serde(named)",
            |p| rmp_serde::to_vec_named(p).unwrap(),
            |b| rmp_serde::from_slice(b).unwrap(),
        ),
    ]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    const ROUNDS: usize = 31;
    const PER_ROUND: usize = 2_000;
    let codecs = codecs();
    let sample = product(0);
    for (name, enc, dec) in &codecs {
        assert_eq!(dec(&enc(&sample)), sample, "{name} round trip");
    }
    let mut enc_t: Vec<Vec<Duration>> = vec![Vec::new(); codecs.len()];
    let mut dec_t: Vec<Vec<Duration>> = vec![Vec::new(); codecs.len()];
    // Alternate codecs round by round, so that drift (other work on the machine) hits all alike.
    for round in 0..ROUNDS {
        for (i, (_, enc, dec)) in codecs.iter().enumerate() {
            let p = product(round as i64);
            let start = Instant::now();
            for _ in 0..PER_ROUND {
                black_box(enc(black_box(&p)));
            }
            enc_t[i].push(start.elapsed() / PER_ROUND as u32);
            let bytes = enc(&p);
            let start = Instant::now();
            for _ in 0..PER_ROUND {
                black_box(dec(black_box(&bytes)));
            }
            dec_t[i].push(start.elapsed() / PER_ROUND as u32);
        }
    }
    let jsonb = jsonb_support();
    let mut report = Report::default();
    report.fact("entity", "Product (12 fields)");
    report.fact("rounds", ROUNDS);
    report.fact("per round", PER_ROUND);
    let total = |i: usize| (median(enc_t[i].clone()) + median(dec_t[i].clone())).as_nanos() as f64;
    let base = codecs
        .iter()
        .position(|(name, _, _)| *name == "rmp-serde")
        .map_or(f64::NAN, total);
    for (i, (name, enc, _)) in codecs.iter().enumerate() {
        let group = format!("codec: {name}");
        let json_ok = jsonb.iter().any(|(n, ok)| n == name && *ok);
        report.value(&group, "encoded size", enc(&sample).len() as f64, "bytes");
        report.value(
            &group,
            "encode, median",
            median(enc_t[i].clone()).as_nanos() as f64,
            "ns",
        );
        report.value(
            &group,
            "decode, median",
            median(dec_t[i].clone()).as_nanos() as f64,
            "ns",
        );
        report.value_vs(
            &group,
            "encode + decode (ratio to rmp-serde)",
            total(i),
            "ns",
            base,
        );
        report.value(
            &group,
            "round-trips a JSONB column (1 = yes)",
            f64::from(u8::from(json_ok)),
            "",
        );
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/codec_bench.json");
    if let Err(e) = report.finish(path) {
        eprintln!("could not write {path}: {e}");
    }
}
