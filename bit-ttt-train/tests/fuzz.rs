//! A bounded run of the loader fuzzer: thousands of mutated inputs per loader, none may panic
//! (an abort or a hang would end or stall the test). The long run is the `fuzz_loaders` example.

use bit_ttt_train::fuzz::{self, Target};

/// Cases per loader in `cargo test` (a checkpoint case trains a step: fewer of those).
fn cases(target: Target) -> u64 {
    match target {
        Target::Checkpoint => 300,
        _ => 2000,
    }
}

#[test]
fn mutated_files_never_panic_any_loader() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for target in Target::ALL {
        let cases = cases(target);
        let report = fuzz::run(target, cases, 17, &dir.path().join(target.name())).unwrap();
        println!("{report}");
        assert_eq!(report.cases, cases);
        assert_eq!(
            report.accepted + report.rejected + report.panic_count,
            cases
        );
        // The mutations must reach both outcomes: all-rejected would mean they only broke the
        // outer format, all-accepted that they never touched anything checked.
        assert!(report.rejected > cases / 10, "{report}");
        assert!(report.accepted > 0, "{report}");
        if report.panic_count > 0 {
            failures.push(format!("{report}\n{:#?}", report.panics));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
