//! The training loop on tiny models: exact resume (TTT-Linear and attention), Ctrl-C stop,
//! divergence.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use bit_ttt_burn::{BitLlama, BitLlamaConfig, MixerKind};
use bit_ttt_train::checkpoint;
use bit_ttt_train::data::Split;
use bit_ttt_train::train::{train, Outcome, ProgressMode, TrainJob, TrainSettings};
use bit_ttt_train::TrainError;
use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Int, Tensor};

type B = Autodiff<NdArray>;

/// NdArray's RNG is global: a model built (or loaded) by one test while another seeds and
/// initializes its own would change the latter's weights. The tests here run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn tiny() -> BitLlamaConfig {
    BitLlamaConfig::tiny(50)
}

/// A token stream with some structure (a noisy cycle), so the loss moves.
fn data() -> Split {
    let mut x: u64 = 1;
    let tokens: Vec<u32> = (0..2000)
        .map(|i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if (x >> 60) < 4 {
                ((x >> 33) % 50) as u32
            } else {
                (i % 13) as u32
            }
        })
        .collect();
    Split {
        train: tokens[..1800].to_vec(),
        valid: tokens[1800..].to_vec(),
    }
}

fn settings() -> TrainSettings {
    TrainSettings {
        seq_len: 16,
        batch_size: 4,
        steps: 6,
        lr: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 2,
        eval_every: 2,
        eval_batches: 2,
        checkpoint_every: 0,
        seed: 7,
        ..TrainSettings::default()
    }
}

fn job<'a>(dir: &'a std::path::Path, data: &'a Split) -> TrainJob<'a> {
    TrainJob {
        run_dir: dir,
        model: tiny(),
        settings: settings(),
        data,
        resume: false,
        extend: false,
        stop_at: None,
        stop_flag: None,
        progress: ProgressMode::Quiet,
        references: vec![],
        // The split of a batch over threads is exercised by every test of this file.
        threads: 2,
    }
}

fn job_with<'a>(dir: &'a std::path::Path, data: &'a Split, mixer: MixerKind) -> TrainJob<'a> {
    TrainJob {
        model: tiny().with_mixer(mixer),
        ..job(dir, data)
    }
}

#[test]
fn stopped_and_resumed_run_repeats_the_uninterrupted_one_ttt_linear() {
    let _serial = serial();
    resume_repeats(MixerKind::TttLinear);
}

#[test]
fn stopped_and_resumed_run_repeats_the_uninterrupted_one_attention() {
    let _serial = serial();
    resume_repeats(MixerKind::Attention);
}

fn resume_repeats(mixer: MixerKind) {
    let data = data();
    let device = Default::default();

    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(job_with(straight_dir.path(), &data, mixer), &device).unwrap();
    assert_eq!(straight.outcome, Outcome::Finished);
    assert_eq!(straight.state.metrics.len(), 6);

    let split_dir = tempfile::tempdir().unwrap();
    let first = train::<B>(
        TrainJob {
            stop_at: Some(3),
            ..job_with(split_dir.path(), &data, mixer)
        },
        &device,
    )
    .unwrap();
    assert_eq!(first.outcome, Outcome::Stopped);
    assert_eq!(first.state.step, 3);
    assert!(checkpoint::latest(split_dir.path())
        .unwrap()
        .ends_with("step-000003"));
    // Another setting given to the resume is refused, not silently ignored.
    let err = train::<B>(
        TrainJob {
            resume: true,
            settings: TrainSettings {
                lr: 123.0,
                ..settings()
            },
            ..job_with(split_dir.path(), &data, mixer)
        },
        &device,
    )
    .unwrap_err();
    assert!(matches!(err, TrainError::ResumeMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("--lr 123 differs from the run's 0.01; pass --extend to apply it"),
        "{err}"
    );
    let resumed = train::<B>(
        TrainJob {
            resume: true,
            ..job_with(split_dir.path(), &data, mixer)
        },
        &device,
    )
    .unwrap();
    assert_eq!(resumed.outcome, Outcome::Finished);

    let losses = |r: &bit_ttt_train::train::TrainReport<NdArray>| {
        r.state
            .metrics
            .iter()
            .map(|m| (m.step, m.lr, m.train_loss, m.val_loss))
            .collect::<Vec<_>>()
    };
    // Bit for bit: same batches, same optimizer moments, same schedule.
    assert_eq!(losses(&straight), losses(&resumed));
    assert_eq!(straight.final_val_loss, resumed.final_val_loss);
    // The saved models are the same (compared through their logits: the safetensors bytes
    // may differ in the order of the metadata keys).
    let logits = |dir: &std::path::Path| {
        let (model, _) = BitLlama::<NdArray>::load(dir, &Default::default()).unwrap();
        let input =
            Tensor::<NdArray, 2, Int>::from_ints([[1, 7, 3, 49, 0, 12]], &Default::default());
        model.forward(input).into_data().to_vec::<f32>().unwrap()
    };
    assert_eq!(logits(straight_dir.path()), logits(split_dir.path()));
    // The loss went down on this easy data.
    let first_loss = straight.state.metrics[0].train_loss;
    assert!(
        straight.final_val_loss.unwrap() < first_loss,
        "{:?}",
        losses(&straight)
    );
}

#[test]
fn extend_applies_schedule_changes_on_resume_but_never_shape_changes() {
    let _serial = serial();
    let data = data();
    let device = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let first = train::<B>(
        TrainJob {
            stop_at: Some(3),
            ..job(dir.path(), &data)
        },
        &device,
    )
    .unwrap();
    let extended = TrainSettings {
        steps: 8,
        lr: 5e-3,
        ..settings()
    };
    let resume = |settings: TrainSettings, model: BitLlamaConfig| {
        train::<B>(
            TrainJob {
                resume: true,
                extend: true,
                settings,
                model,
                ..job(dir.path(), &data)
            },
            &device,
        )
    };

    // The batch shape and the model cannot change, --extend or not; each is named.
    let err = resume(
        TrainSettings {
            seq_len: 8,
            ..extended.clone()
        },
        BitLlamaConfig {
            d_model: 32,
            ..tiny()
        },
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TrainError::ResumeMismatch { .. }), "{text}");
    assert!(
        text.contains("--seq-len 8 differs from the run's 16"),
        "{text}"
    );
    assert!(
        text.contains("--d-model 32 differs from the run's 64"),
        "{text}"
    );
    assert!(!text.contains("--steps"), "{text}");
    // Fewer steps than done is an error too.
    let err = resume(
        TrainSettings {
            steps: 2,
            ..settings()
        },
        tiny(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("--steps 2 is fewer"), "{err}");

    let report = resume(extended.clone(), tiny()).unwrap();
    assert_eq!(report.outcome, Outcome::Finished);
    assert_eq!(report.state.step, 8);
    assert_eq!(report.state.settings, extended);
    // The first steps are the stopped run's (the timing fields went through JSON).
    let losses = |rows: &[bit_ttt_train::metrics::MetricRow]| {
        rows.iter()
            .map(|m| (m.step, m.lr, m.train_loss, m.val_loss))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        losses(&report.state.metrics[..3]),
        losses(&first.state.metrics)
    );
    // Steps 4.. follow the new schedule.
    for row in &report.state.metrics[3..] {
        assert_eq!(
            row.lr,
            extended.schedule().lr(row.step - 1),
            "step {}",
            row.step
        );
    }
    let saved = checkpoint::load_state(&checkpoint::latest(dir.path()).unwrap()).unwrap();
    assert_eq!(saved.settings, extended);
}

#[test]
fn a_run_directory_in_use_is_refused() {
    let _serial = serial();
    let data = data();
    let dir = tempfile::tempdir().unwrap();
    let _held = checkpoint::RunLock::acquire(dir.path()).unwrap();
    let err = train::<B>(job(dir.path(), &data), &Default::default()).unwrap_err();
    assert!(matches!(err, TrainError::RunLocked { .. }), "{err}");
    assert!(!checkpoint::checkpoint_root(dir.path()).exists());
}

#[test]
fn stop_flag_saves_a_checkpoint_after_the_current_step() {
    let _serial = serial();
    let data = data();
    let dir = tempfile::tempdir().unwrap();
    let report = train::<B>(
        TrainJob {
            stop_flag: Some(Arc::new(AtomicBool::new(true))),
            ..job(dir.path(), &data)
        },
        &Default::default(),
    )
    .unwrap();
    assert_eq!(report.outcome, Outcome::Interrupted);
    assert_eq!(report.state.step, 1);
    let latest = checkpoint::latest(dir.path()).unwrap();
    assert_eq!(report.last_checkpoint.as_deref(), Some(latest.as_path()));
    // The checkpoint is a loadable model directory.
    BitLlama::<NdArray>::load(&latest, &Default::default()).unwrap();
}

#[test]
fn divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint() {
    let _serial = serial();
    let data = data();
    let dir = tempfile::tempdir().unwrap();
    // A learning rate of 1e30 overflows the weights within a few steps.
    let err = train::<B>(
        TrainJob {
            settings: TrainSettings {
                lr: 1e30,
                min_lr: 1e30,
                warmup_steps: 0,
                checkpoint_every: 1,
                steps: 20,
                ..settings()
            },
            ..job(dir.path(), &data)
        },
        &Default::default(),
    )
    .unwrap_err();
    let TrainError::Diverged {
        step,
        last_checkpoint,
        ..
    } = &err
    else {
        panic!("expected divergence, got {err}");
    };
    assert!(err.to_string().contains("training diverged"), "{err}");
    let last = last_checkpoint.as_ref().expect("step 1 was checkpointed");
    assert!(*step >= 2);
    assert_eq!(&checkpoint::latest(dir.path()).unwrap(), last);
    assert_eq!(checkpoint::load_state(last).unwrap().step, step - 1);
    BitLlama::<NdArray>::load(last, &Default::default()).unwrap();
    // Nothing half-written is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(checkpoint::checkpoint_root(dir.path()))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn resume_without_checkpoint_and_bad_settings_are_errors() {
    let _serial = serial();
    let data = data();
    let dir = tempfile::tempdir().unwrap();
    let err = train::<B>(
        TrainJob {
            resume: true,
            ..job(dir.path(), &data)
        },
        &Default::default(),
    )
    .unwrap_err();
    assert!(matches!(err, TrainError::NoCheckpoint { .. }), "{err}");
    let err = train::<B>(
        TrainJob {
            settings: TrainSettings {
                seq_len: 500,
                ..settings()
            },
            ..job(dir.path(), &data)
        },
        &Default::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            TrainError::NotEnoughData {
                split: "validation",
                ..
            }
        ),
        "{err}"
    );
}
