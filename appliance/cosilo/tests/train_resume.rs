//! `cosilo train` as a real process: SIGKILLed in the middle of training, re-run, it resumes from
//! the store's checkpoint and ends with exactly the model an uninterrupted run produces.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use cosilo_sdk::volume::{write_nifti_f32, write_nifti_labels, Geometry, Volume};
use cosilo_store::{Split, Store};
use cosilo_train::TrainConfig;

fn cosilo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cosilo"))
}

/// A 32×32×6 case: a bright disc (label 1) inside a dimmer ring (label 2), placed by `n`.
fn write_case(dir: &Path, n: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let g = Geometry::axis_aligned([32, 32, 6], [1.0, 1.0, 2.0], [0.0; 3]);
    let (cx, cy) = (12.0 + (n % 3) as f64 * 3.0, 13.0 + (n % 2) as f64 * 4.0);
    let mut image = Volume::filled(g.clone(), 0f32);
    let mut label = Volume::filled(g, 0u8);
    for k in 0..6 {
        for j in 0..32 {
            for i in 0..32 {
                let r = ((i as f64 - cx).powi(2) + (j as f64 - cy).powi(2)).sqrt();
                let idx = i + 32 * (j + 32 * k);
                let wobble = ((i * 7 + j * 13 + k * 5 + n) % 11) as f32 / 100.0;
                let (l, v) = if r < 4.0 {
                    (1, 200.0)
                } else if r < 8.0 {
                    (2, 120.0)
                } else if r < 12.0 {
                    (0, 60.0)
                } else {
                    (0, 0.0)
                };
                label.data[idx] = l;
                image.data[idx] = if v > 0.0 { v * (1.0 + wobble) } else { 0.0 };
            }
        }
    }
    let (ip, lp) = (
        dir.join(format!("c{n}_image.nii.gz")),
        dir.join(format!("c{n}_label.nii.gz")),
    );
    write_nifti_f32(&ip, &image).unwrap();
    write_nifti_labels(&lp, &label).unwrap();
    (ip, lp)
}

fn config(dir: &Path) -> std::path::PathBuf {
    let mut cfg = TrainConfig::default();
    cfg.model.base = 4;
    cfg.model.depth = 2;
    cfg.model.groups = 2;
    cfg.model.classes = 3;
    cfg.label_map = vec![0, 1, 2];
    cfg.class_names = vec!["background".into(), "disc".into(), "ring".into()];
    cfg.epochs = 5;
    cfg.steps_per_epoch = 12;
    cfg.batch_size = 4;
    cfg.patch = [32, 32];
    cfg.checkpoint_every = 3;
    cfg.validate().unwrap();
    let p = dir.join("train.toml");
    std::fs::write(&p, toml::to_string(&cfg).unwrap()).unwrap();
    p
}

fn make_store(dir: &Path, data: &Path) {
    let store = Store::open(dir).unwrap();
    for n in 0..5 {
        let (ip, lp) = write_case(data, n);
        let split = if n < 4 { Split::Train } else { Split::Test };
        store
            .import_case(&format!("c{n}"), split, &ip, &lp, "h0")
            .unwrap();
    }
}

fn export(store: &Path, out: &Path) -> Vec<u8> {
    let st = cosilo()
        .args(["export", "--run", "r", "--store"])
        .arg(store)
        .arg("--out")
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(out.join("model.onnx")).unwrap()
}

#[test]
fn killed_training_resumes_to_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let cfg = config(tmp.path());
    let (straight, interrupted) = (tmp.path().join("straight"), tmp.path().join("interrupted"));
    make_store(&straight, &data);
    make_store(&interrupted, &data);

    let out = cosilo()
        .args(["train", "--run", "r", "--store"])
        .arg(&straight)
        .arg("--config")
        .arg(&cfg)
        .arg("--report")
        .arg(tmp.path().join("report"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("epoch   5:") && text.contains("| **mean** |"),
        "{text}"
    );
    assert!(tmp.path().join("report/curve.svg").exists());

    // Kill the second run as soon as it reports its second epoch (checkpoints exist by then).
    let mut child = cosilo()
        .args(["train", "--run", "r", "--store"])
        .arg(&interrupted)
        .arg("--config")
        .arg(&cfg)
        .arg("--report")
        .arg(tmp.path().join("report-killed"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let stop = line.starts_with("epoch   2:");
        seen.push(line);
        if stop {
            child.kill().unwrap(); // SIGKILL on Unix: no chance to clean up
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the run finished before it was killed: {seen:?}"
    );

    let out = cosilo()
        .args(["train", "--run", "r", "--store"])
        .arg(&interrupted)
        .arg("--config")
        .arg(&cfg)
        .arg("--report")
        .arg(tmp.path().join("report-resumed"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("resuming at epoch"), "{text}");
    assert!(
        !text.contains("epoch   1:"),
        "epoch 1 was trained again: {text}"
    );
    assert!(text.contains("epoch   5:"), "{text}");

    // Same seed, same batches, same updates: the resumed model is the uninterrupted one.
    let a = export(&straight, &tmp.path().join("a"));
    let b = export(&interrupted, &tmp.path().join("b"));
    assert_eq!(a.len(), b.len());
    assert!(a == b, "resumed model differs from the uninterrupted one");
}
