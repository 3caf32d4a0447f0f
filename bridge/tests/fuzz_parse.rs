//! Mutation fuzzing of the path bytes take from the network: the DIMSE command-set decoder, and
//! for data sets what the SCP does with a P-DATA payload in each transfer syntax: the length guard
//! (`guard::check_dataset_lengths`), then `InMemDicomObject::read_dataset_with_ts`, then
//! de-identification of whatever parses.
//!
//! A seeded loop (xorshift; the seed is printed and fixed, so a failure reproduces) applies bit
//! flips, truncations, length-field corruption, insertions and deletions to real sample data and
//! asserts that nothing panics. The data-set loop runs in a child process (this test binary
//! re-executed with `COSILO_FUZZ_CHILD=1`) under an address-space cap (RLIMIT_AS, 1 GiB), so a
//! corrupted length that makes a parser allocate without bound aborts the child and fails the
//! test instead of killing the harness; a counting allocator also bounds each case's peak heap.
//! Findings are recorded in bridge/FUZZING.md.

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use cosilo_bridge::deid::{DatePolicy, Deidentifier};
use cosilo_bridge::dimse::{self, CEchoRq};
use cosilo_bridge::guard::{check_dataset_lengths, has_short_length, GuardError};
use dicom::object::{open_file, InMemDicomObject};
use dicom::transfer_syntax::TransferSyntaxIndex;
use dicom::transfer_syntax::TransferSyntaxRegistry;

/// Cases per seed input for the data set parser (COSILO_FUZZ_CASES overrides).
const CASES_PER_INPUT: usize = 600;
/// The address-space cap: far above what the samples need, far below the ~4 GiB a corrupted
/// length made dicom-parser 0.10.1 allocate.
const ADDRESS_SPACE_CAP: u64 = 1 << 30;
/// Set in the child process that runs the data-set loop.
const CHILD_ENV: &str = "COSILO_FUZZ_CHILD";

/// Counts live heap bytes and their peak, so each case's allocation can be bounded.
struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grow = new_size - layout.size();
                let now = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Resets the peak to the current live bytes and returns that baseline.
fn reset_peak() -> usize {
    let now = LIVE.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// Length-field mutation kinds, as bits in what [`mutate`] returns.
const LENGTH_32: u32 = 4;
const LENGTH_16: u32 = 8;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `input`, with the mutation kinds applied (bit `1 << kind`).
fn mutate(rng: &mut Rng, input: &[u8]) -> (Vec<u8>, u32) {
    let mut b = input.to_vec();
    let mut kinds = 0u32;
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        if b.is_empty() {
            b.push(0);
        }
        let kind = rng.below(6);
        kinds |= 1 << kind;
        match kind {
            0 => {
                // bit flips
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let n = rng.below(b.len());
                b.truncate(n);
            }
            2 => {
                // a 32-bit length field: huge, odd, or just off by a little
                let i = rng.below(b.len().saturating_sub(4).max(1));
                let v: u32 = match rng.below(4) {
                    0 => 0xFFFF_FFFF,
                    1 => 0xFFFF_FFFE,
                    2 => rng.next() as u32,
                    _ => u32::from_le_bytes([
                        b[i],
                        *b.get(i + 1).unwrap_or(&0),
                        *b.get(i + 2).unwrap_or(&0),
                        *b.get(i + 3).unwrap_or(&0),
                    ])
                    .wrapping_add(rng.below(16) as u32 + 1),
                };
                for (k, byte) in v.to_le_bytes().iter().enumerate() {
                    if let Some(x) = b.get_mut(i + k) {
                        *x = *byte;
                    }
                }
            }
            3 => {
                // a 16-bit length field
                let i = rng.below(b.len().saturating_sub(2).max(1));
                let v = (rng.next() as u16).to_le_bytes();
                for (k, byte) in v.iter().enumerate() {
                    if let Some(x) = b.get_mut(i + k) {
                        *x = *byte;
                    }
                }
            }
            4 => {
                let i = rng.below(b.len());
                let n = rng.below(64);
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            _ => {
                let i = rng.below(b.len());
                let n = 1 + rng.below(32);
                let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(i..i, junk);
            }
        }
    }
    (b, kinds)
}

/// Corrupts the length field of a real element header: walks the top-level elements of an
/// explicit VR LE / implicit VR LE encoding and overwrites one length with a large value.
fn corrupt_a_length(rng: &mut Rng, input: &[u8], explicit: bool, big_endian: bool) -> Vec<u8> {
    let mut b = input.to_vec();
    let mut fields: Vec<(usize, usize)> = Vec::new(); // (offset, width)
    let mut pos = 0usize;
    let rd16 = |b: &[u8], p: usize| {
        let x = [b[p], b[p + 1]];
        if big_endian {
            u16::from_be_bytes(x)
        } else {
            u16::from_le_bytes(x)
        }
    };
    let rd32 = |b: &[u8], p: usize| {
        let x = [b[p], b[p + 1], b[p + 2], b[p + 3]];
        if big_endian {
            u32::from_be_bytes(x)
        } else {
            u32::from_le_bytes(x)
        }
    };
    while pos + 12 <= b.len() {
        let short = explicit && has_short_length([b[pos + 4], b[pos + 5]]);
        let (at, width, len, value) = if !explicit {
            (pos + 4, 4, rd32(&b, pos + 4), pos + 8)
        } else if short {
            (pos + 6, 2, u32::from(rd16(&b, pos + 6)), pos + 8)
        } else {
            (pos + 8, 4, rd32(&b, pos + 8), pos + 12)
        };
        fields.push((at, width));
        if len == u32::MAX {
            break; // a sequence: stop at the first one (its items are covered by random hits)
        }
        pos = value + len as usize;
    }
    if fields.is_empty() {
        return b;
    }
    let (at, width) = fields[rng.below(fields.len())];
    let v: u32 = match rng.below(3) {
        0 => 0xFFFF_FFF0,
        1 => 0xDEAD_BEEF,
        _ => (b.len() as u32).wrapping_add(1 + rng.below(1 << 20) as u32),
    };
    let bytes: Vec<u8> = match (width, big_endian) {
        (2, false) => (v as u16 | 0x8000).to_le_bytes().to_vec(),
        (2, true) => (v as u16 | 0x8000).to_be_bytes().to_vec(),
        (_, false) => v.to_le_bytes().to_vec(),
        (_, true) => v.to_be_bytes().to_vec(),
    };
    b[at..at + width].copy_from_slice(&bytes);
    b
}

fn cap_address_space() {
    let cap = std::env::var("COSILO_FUZZ_CAP_MB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(ADDRESS_SPACE_CAP, |mb| mb << 20);
    let lim = libc::rlimit {
        rlim_cur: cap,
        rlim_max: cap,
    };
    // SAFETY: setrlimit with a valid pointer to an initialised struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
    assert_eq!(rc, 0, "cannot cap the address space");
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("COSILO_PYTHON") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

fn sample_files() -> Vec<PathBuf> {
    let out = Command::new(python())
        .args([
            "-c",
            "import pydicom, os; print(os.path.dirname(pydicom.__file__))",
        ])
        .output()
        .expect("run python to locate pydicom");
    assert!(
        out.status.success(),
        "pydicom is needed in {}",
        python().display()
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
        .join("data/test_files");
    let mut files: Vec<PathBuf> = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm"]
        .iter()
        .map(|n| dir.join(n))
        .collect();
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    let deid_data = home.join(".cache/cosilo/deid-data/deid-data-0.0.20/deid_data/data");
    for f in ["humans/ctbrain1.dcm", "dicom-cookies/image1.dcm"] {
        let p = deid_data.join(f);
        assert!(
            p.is_file(),
            "{} missing: run the deid tests first (they fetch deid-data with pip)",
            p.display()
        );
        files.push(p);
    }
    files
}

/// Transfer syntaxes a P-DATA payload may arrive in (the SCP's uncompressed ones; encapsulated
/// ones parse like explicit VR LE).
const SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2",      // implicit VR LE
    "1.2.840.10008.1.2.1",    // explicit VR LE
    "1.2.840.10008.1.2.2",    // explicit VR BE (retired)
    "1.2.840.10008.1.2.1.99", // deflated explicit VR LE
];

/// What the child reports on its last line, parsed by the parent.
#[derive(Debug, Default)]
struct Summary {
    cases: usize,
    length_cases: usize,
    refused: usize,
    refused_length: usize,
    parsed: usize,
    deidentified: usize,
    max_peak: usize,
    panics: usize,
}

impl Summary {
    fn line(&self) -> String {
        format!(
            "FUZZ-SUMMARY cases={} length_cases={} refused={} refused_length={} parsed={} \
             deidentified={} max_peak={} panics={}",
            self.cases,
            self.length_cases,
            self.refused,
            self.refused_length,
            self.parsed,
            self.deidentified,
            self.max_peak,
            self.panics
        )
    }
    fn parse(line: &str) -> Option<Summary> {
        let mut s = Summary::default();
        let at = line.find("FUZZ-SUMMARY ")?;
        for kv in line[at + "FUZZ-SUMMARY ".len()..].trim().split(' ') {
            let (k, v) = kv.split_once('=')?;
            let v: usize = v.parse().ok()?;
            match k {
                "cases" => s.cases = v,
                "length_cases" => s.length_cases = v,
                "refused" => s.refused = v,
                "refused_length" => s.refused_length = v,
                "parsed" => s.parsed = v,
                "deidentified" => s.deidentified = v,
                "max_peak" => s.max_peak = v,
                "panics" => s.panics = v,
                _ => return None,
            }
        }
        Some(s)
    }
}

/// Heap a guarded parse plus de-identification of `n` input bytes may use at its peak: a few
/// copies of the input plus per-element overhead, nowhere near a declared 4 GiB.
fn peak_bound(n: usize) -> usize {
    16 * n + (16 << 20)
}

/// The data-set loop, run in the child under the address-space cap. Returns its summary and
/// the failures (panics, unbounded peaks) it saw.
fn dataset_loop() -> (Summary, Vec<String>) {
    cap_address_space();
    let deid = Deidentifier::new(b"fuzzing-secret-0123456789abcdef", DatePolicy::KeepYear)
        .unwrap()
        .with_unmarked_pixels_accepted(true);
    // COSILO_FUZZ_NO_GUARD=1 shows what the guard prevents (the child then aborts).
    let no_guard = std::env::var_os("COSILO_FUZZ_NO_GUARD").is_some();
    let mut rng = Rng(0x5EED_C051_10F0_2026);
    let mut sum = Summary::default();
    let mut failures: Vec<String> = Vec::new();
    let per_input = std::env::var("COSILO_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES_PER_INPUT);

    for file in sample_files() {
        let obj = open_file(&file).unwrap().into_inner();
        for ts_uid in SYNTAXES {
            let ts = TransferSyntaxRegistry.get(ts_uid).expect("known syntax");
            let mut seed = Vec::new();
            if obj.write_dataset_with_ts(&mut seed, ts).is_err() {
                continue; // e.g. encapsulated pixel data in a native syntax
            }
            if InMemDicomObject::read_dataset_with_ts(&seed[..], ts).is_err() {
                // dicom-rs writes encapsulated pixel data in explicit VR BE with little-endian
                // item tags, which it cannot read back: not a valid seed.
                eprintln!("{} in {ts_uid}: seed does not read back", file.display());
                continue;
            }
            check_dataset_lengths(&seed, ts)
                .unwrap_or_else(|e| panic!("{} in {ts_uid}: seed refused: {e}", file.display()));
            let deflated = ts_uid.ends_with(".99");
            let t0 = Instant::now();
            for case in 0..per_input {
                let state = rng.0;
                // Every third case (not for deflate) corrupts a real length field; the others
                // are random mutations, which include random length corruption.
                let (bytes, kinds) = if case % 3 == 0 && !deflated {
                    let explicit = *ts_uid != "1.2.840.10008.1.2";
                    let big = ts_uid.ends_with(".2.2");
                    (corrupt_a_length(&mut rng, &seed, explicit, big), LENGTH_32)
                } else {
                    mutate(&mut rng, &seed)
                };
                let length_case = kinds & (LENGTH_32 | LENGTH_16) != 0;
                sum.cases += 1;
                sum.length_cases += usize::from(length_case);
                let what = format!(
                    "{} in {ts_uid}, case {case}, rng state {state:#x}, {} bytes",
                    file.display(),
                    bytes.len()
                );
                let base = reset_peak();
                let r = catch_unwind(AssertUnwindSafe(|| {
                    if !no_guard {
                        check_dataset_lengths(&bytes, ts)?;
                    }
                    let parsed = InMemDicomObject::read_dataset_with_ts(&bytes[..], ts).ok();
                    let deidentified = parsed.as_ref().map(|o| deid.deidentify(o).is_ok());
                    Ok::<_, GuardError>(deidentified)
                }));
                let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
                sum.max_peak = sum.max_peak.max(peak);
                if peak > peak_bound(bytes.len()) {
                    failures.push(format!("peak heap {peak} bytes: {what}"));
                }
                match r {
                    Err(_) => {
                        sum.panics += 1;
                        failures.push(format!("panic: {what}"));
                    }
                    Ok(Err(_)) => {
                        sum.refused += 1;
                        sum.refused_length += usize::from(length_case);
                    }
                    Ok(Ok(None)) => {}
                    Ok(Ok(Some(d))) => {
                        sum.parsed += 1;
                        sum.deidentified += usize::from(d);
                    }
                }
            }
            eprintln!(
                "{} in {ts_uid}: {per_input} cases in {:.2} s",
                file.display(),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    (sum, failures)
}

/// The child side of [`mutated_datasets_never_abort_panic_or_allocate_without_bound`]; a no-op
/// unless `COSILO_FUZZ_CHILD` is set. Ignored, so that a plain run does not count it as a pass;
/// the parent runs it with `--ignored`.
#[test]
#[ignore = "child process of mutated_datasets_never_abort_panic_or_allocate_without_bound"]
fn dataset_fuzz_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let (sum, failures) = dataset_loop();
    println!("{}", sum.line());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn mutated_datasets_never_abort_panic_or_allocate_without_bound() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let start = Instant::now();
    let out = Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "--exact",
            "dataset_fuzz_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .expect("re-run the test binary");
    let secs = start.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "the fuzz child failed ({}; an abort means unbounded allocation):\n{stdout}\n{stderr}",
        out.status
    );
    let sum = stdout
        .lines()
        .find_map(Summary::parse)
        .unwrap_or_else(|| panic!("no summary from the child:\n{stdout}"));
    eprintln!("{} in {secs:.1} s", sum.line());
    assert!(sum.cases >= 10_000, "only {} cases", sum.cases);
    assert_eq!(sum.panics, 0);
    assert!(
        sum.parsed > 0,
        "no mutated data set parsed: the seeds are wrong"
    );
    assert!(sum.deidentified > 0, "nothing reached de-identification");
    assert!(
        sum.length_cases >= sum.cases / 4,
        "too few length corruptions"
    );
    // The targeted corruptions all declare more than the input holds (or, for 16-bit fields,
    // at least 32 KiB): most of them must be refused.
    assert!(
        sum.refused_length * 2 >= sum.length_cases,
        "only {} of {} length-corrupted cases refused",
        sum.refused_length,
        sum.length_cases
    );
    assert!(secs < 60.0, "the loop took {secs:.1} s");
}

#[test]
fn mutated_command_sets_never_panic() {
    cap_address_space();
    let mut rng = Rng(0xD1_45E0_C0DE);
    let mut panics: Vec<String> = Vec::new();
    // The DIMSE command-set decoder.
    let mut seeds: Vec<Vec<u8>> = vec![dimse::Command::EchoRq(CEchoRq { message_id: 7 }).encode()];
    seeds.push(
        dimse::Command::CancelRq {
            message_id_being_responded_to: 3,
        }
        .encode(),
    );
    let mut commands = 0;
    for seed in &seeds {
        assert!(dimse::Command::decode(seed).is_ok());
        for _ in 0..5_000 {
            let (bytes, _) = mutate(&mut rng, seed);
            commands += 1;
            if catch_unwind(|| {
                let _ = dimse::Command::decode(&bytes);
            })
            .is_err()
            {
                panics.push(format!("dimse panic: {bytes:02x?}"));
            }
        }
    }
    eprintln!("{commands} command sets, {} panics", panics.len());
    assert_eq!(commands, 10_000);
    assert!(panics.is_empty(), "{}", panics.join("\n"));
}
