//! libFuzzer target: the SCP's path for a received data set. The first input byte picks the
//! transfer syntax (implicit VR LE, explicit VR LE, explicit VR BE, deflated explicit VR LE); the
//! rest is the P-DATA data set. Guard, then parse what it accepts, then de-identify what parses.
//! Run with `-malloc_limit_mb=1024` so an allocation of a declared length fails the run.
#![no_main]

use std::sync::OnceLock;

use cosilo_bridge::deid::{DatePolicy, Deidentifier};
use cosilo_bridge::guard::check_dataset_lengths;
use dicom::object::InMemDicomObject;
use dicom::transfer_syntax::{TransferSyntaxIndex, TransferSyntaxRegistry};
use libfuzzer_sys::fuzz_target;

const SYNTAXES: [&str; 4] = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
];

fn deid() -> &'static Deidentifier {
    static D: OnceLock<Deidentifier> = OnceLock::new();
    D.get_or_init(|| {
        Deidentifier::new(b"fuzzing-secret-0123456789abcdef", DatePolicy::KeepYear)
            .expect("valid secret")
            .with_unmarked_pixels_accepted(true)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let Some(ts) = TransferSyntaxRegistry.get(SYNTAXES[usize::from(sel) % SYNTAXES.len()]) else {
        return;
    };
    if check_dataset_lengths(bytes, ts).is_err() {
        return;
    }
    if let Ok(obj) = InMemDicomObject::read_dataset_with_ts(bytes, ts) {
        let _ = deid().deidentify(&obj);
    }
});
