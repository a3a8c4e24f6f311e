//! Backend selection: `--device ndarray|wgpu|cuda`.

use crate::TrainError;

/// A backend the command line can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    /// CPU, Burn's NdArray backend (always available in the default build).
    Ndarray,
    /// GPU through wgpu (Vulkan, Metal, DX12; software Vulkan works too). Feature `wgpu`.
    Wgpu,
    /// NVIDIA GPU through CUDA. Feature `cuda`.
    Cuda,
}

impl DeviceKind {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Ndarray => "ndarray",
            DeviceKind::Wgpu => "wgpu",
            DeviceKind::Cuda => "cuda",
        }
    }

    /// Whether this binary was built with the backend.
    pub fn compiled_in(self) -> bool {
        match self {
            DeviceKind::Ndarray => cfg!(feature = "ndarray"),
            DeviceKind::Wgpu => cfg!(feature = "wgpu"),
            DeviceKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// Checks the backend is compiled in.
    ///
    /// # Errors
    /// [`TrainError::InvalidSetting`] saying how to rebuild with it.
    pub fn check(self) -> Result<Self, TrainError> {
        if self.compiled_in() {
            Ok(self)
        } else {
            Err(TrainError::InvalidSetting(format!(
                "device {} is not compiled into this binary; rebuild with `--features {}` \
                 (e.g. cargo run --release -p bit-ttt-train --features {} -- ...)",
                self.name(),
                self.name(),
                self.name()
            )))
        }
    }
}

/// Runs `$body` with the type alias `$B` bound to the backend of `$kind` (without autodiff)
/// and `$device` to its default device. `$kind` must have passed [`DeviceKind::check`].
#[macro_export]
macro_rules! with_backend {
    ($kind:expr, |$B:ident, $device:ident| $body:expr) => {{
        match $kind {
            #[cfg(feature = "ndarray")]
            $crate::device::DeviceKind::Ndarray => {
                type $B = burn::backend::NdArray;
                let $device = burn::backend::ndarray::NdArrayDevice::Cpu;
                $body
            }
            #[cfg(feature = "wgpu")]
            $crate::device::DeviceKind::Wgpu => {
                type $B = burn::backend::Wgpu;
                let $device = burn::backend::wgpu::WgpuDevice::default();
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::device::DeviceKind::Cuda => {
                type $B = burn::backend::Cuda;
                let $device = burn::backend::cuda::CudaDevice::default();
                $body
            }
            #[allow(unreachable_patterns)]
            other => Err($crate::device::DeviceKind::check(other).unwrap_err().into()),
        }
    }};
}
