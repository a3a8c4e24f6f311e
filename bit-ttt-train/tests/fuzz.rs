//! A bounded run of the loader fuzzer: thousands of mutated inputs per loader, none may panic
//! (an abort or a hang would end or stall the test). The long run is the `fuzz_loaders` example.

use bit_ttt_train::fuzz::{self, Target};

/// Cases per loader in `cargo test`.
const CASES: u64 = 2000;

#[test]
fn mutated_files_never_panic_any_loader() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for target in Target::ALL {
        let report = fuzz::run(target, CASES, 17, &dir.path().join(target.name())).unwrap();
        println!("{report}");
        assert_eq!(report.cases, CASES);
        assert_eq!(
            report.accepted + report.rejected + report.panic_count,
            CASES
        );
        // The mutations must reach both outcomes: all-rejected would mean they only broke the
        // outer format, all-accepted that they never touched anything checked.
        assert!(report.rejected > CASES / 10, "{report}");
        assert!(report.accepted > 0, "{report}");
        if report.panic_count > 0 {
            failures.push(format!("{report}\n{:#?}", report.panics));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
