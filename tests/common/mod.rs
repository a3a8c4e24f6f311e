//! Helpers shared by the integration tests.

use std::io::Write;

/// Whether a wgpu adapter exists (on CI: Debian's lavapipe, the software Vulkan driver).
///
/// Returns `false` (and the caller skips, saying so) when there is none, unless
/// `BIT_TTT_REQUIRE_WGPU=1` is set: then a missing adapter fails the test, so CI can never
/// skip the wgpu tests silently.
pub fn wgpu_available(test: &str) -> bool {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let adapters =
        futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    if !adapters.is_empty() {
        return true;
    }
    if std::env::var("BIT_TTT_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
        panic!("{test}: BIT_TTT_REQUIRE_WGPU=1 but no wgpu adapter was found (install mesa-vulkan-drivers)");
    }
    // Not eprintln!: the test harness captures the print macros and shows their output only for
    // failing tests, so a skipped (passing) test would hide why it did nothing. A write to the
    // stderr handle itself is not captured and always reaches the terminal.
    let _ = writeln!(
        std::io::stderr(),
        "{test}: SKIPPED, no wgpu adapter (install mesa-vulkan-drivers, \
         or set BIT_TTT_REQUIRE_WGPU=1 to fail instead)"
    );
    false
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "slices of different lengths");
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}
