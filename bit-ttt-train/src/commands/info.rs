//! `info`: the compiled-in backends and versions.

use crate::device::DeviceKind;

/// Prints the compiled-in backends and versions.
pub fn run() {
    println!("bit-ttt-train {}", env!("CARGO_PKG_VERSION"));
    println!("burn 0.21.0");
    let backends: Vec<&str> = [DeviceKind::Ndarray, DeviceKind::Wgpu, DeviceKind::Cuda]
        .into_iter()
        .filter(|d| d.compiled_in())
        .map(DeviceKind::name)
        .collect();
    println!("backends: {}", backends.join(", "));
}
