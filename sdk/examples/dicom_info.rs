//! Reads a DICOM image series (and optionally a SEG on it) with the SDK and prints what it found:
//! grid, spacing, affine (RAS), value range, the time taken, and the SEG's segments.
//!
//! `cargo run --release -p cosilo-sdk --example dicom_info -- SERIES_DIR [SEG_FILE]`

use std::time::Instant;

use cosilo_sdk::dicom::{read_seg, read_seg_segments, read_series_dir};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args
        .first()
        .ok_or_else(|| anyhow::anyhow!("usage: dicom_info SERIES_DIR [SEG_FILE]"))?;
    let t0 = Instant::now();
    let s = read_series_dir(dir)?;
    let seconds = t0.elapsed().as_secs_f64();
    let g = &s.volume.geometry;
    let (lo, hi) = s
        .volume
        .data
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    println!(
        "{dir}: {} {} instances read in {seconds:.3} s ({})",
        s.modality,
        s.sop_instances.len(),
        s.transfer_syntax
    );
    println!(
        "dims {:?}, spacing {:.4?} mm, values {lo} ..= {hi}",
        g.dims,
        g.spacing()
    );
    for row in &g.affine {
        println!(
            "  [{:>10.4} {:>10.4} {:>10.4} {:>10.4}]",
            row[0], row[1], row[2], row[3]
        );
    }
    println!(
        "patient {:?} ({}), study {}, series {}",
        s.study.patient_name, s.study.patient_id, s.study_uid, s.series_uid
    );
    if let Some(seg) = args.get(1) {
        let t0 = Instant::now();
        let labels = read_seg(seg, &s)?;
        let seconds = t0.elapsed().as_secs_f64();
        println!("{seg}: read in {seconds:.3} s");
        for (n, d) in read_seg_segments(seg)? {
            let voxels = labels.data.iter().filter(|&&v| v as u16 == n).count();
            println!(
                "  segment {n} {:?} ({} {}): {voxels} voxels",
                d.label, d.property_type.scheme, d.property_type.value
            );
        }
    }
    Ok(())
}
