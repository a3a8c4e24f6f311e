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

    /// Checks the backend is compiled in and, for a GPU backend, that its device opens.
    ///
    /// # Errors
    /// [`TrainError::InvalidSetting`] saying how to rebuild with it, or that no GPU adapter or
    /// driver was found.
    pub fn check(self) -> Result<Self, TrainError> {
        if !self.compiled_in() {
            return Err(TrainError::InvalidSetting(format!(
                "device {} is not compiled into this binary; rebuild with `--features {}` \
                 (e.g. cargo run --release -p bit-ttt-train --features {} -- ...)",
                self.name(),
                self.name(),
                self.name()
            )));
        }
        self.probe()?;
        Ok(self)
    }

    /// Opens the backend's default device once per process with a one-value tensor: Burn and
    /// cubecl panic on the first use of a device when there is no adapter or driver, which
    /// must reach the user as an error, not a crash in the middle of a run.
    fn probe(self) -> Result<(), TrainError> {
        use std::sync::OnceLock;
        static WGPU: OnceLock<Result<(), String>> = OnceLock::new();
        static CUDA: OnceLock<Result<(), String>> = OnceLock::new();
        let (cell, first_use): (_, fn()) = match self {
            DeviceKind::Ndarray => return Ok(()),
            DeviceKind::Wgpu => (&WGPU, use_wgpu),
            DeviceKind::Cuda => (&CUDA, use_cuda),
        };
        cell.get_or_init(|| probe_with(self, first_use))
            .clone()
            .map_err(TrainError::InvalidSetting)
    }
}

fn use_wgpu() {
    #[cfg(feature = "wgpu")]
    {
        use burn::tensor::Tensor;
        let device = burn::backend::wgpu::WgpuDevice::default();
        Tensor::<burn::backend::Wgpu, 1>::ones([1], &device).into_data();
    }
}

fn use_cuda() {
    #[cfg(feature = "cuda")]
    {
        use burn::tensor::Tensor;
        let device = burn::backend::cuda::CudaDevice::default();
        Tensor::<burn::backend::Cuda, 1>::ones([1], &device).into_data();
    }
}

/// Name of the thread [`probe_with`] runs in; the panic hook keeps that thread's panics quiet.
const PROBE_THREAD: &str = "bit-ttt-device-probe";

/// Runs `first_use` in a thread of its own and turns a panic into a message naming `kind`,
/// without the panic's own report on stderr.
fn probe_with(kind: DeviceKind, first_use: fn()) -> Result<(), String> {
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some(PROBE_THREAD) {
                previous(info);
            }
        }));
    });
    let outcome = std::thread::Builder::new()
        .name(PROBE_THREAD.into())
        .spawn(first_use)
        .map_err(|e| {
            format!(
                "cannot start a thread to open the {} device: {e}",
                kind.name()
            )
        })?
        .join();
    outcome.map_err(|payload| {
        let why = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown reason".into());
        let hint = match kind {
            DeviceKind::Cuda => "an NVIDIA GPU with its driver (libcuda) and nvrtc",
            _ => "a GPU adapter (Vulkan, Metal or DX12; on Linux without a GPU: apt-get install mesa-vulkan-drivers libvulkan1)",
        };
        format!(
            "device {} cannot be opened ({why}); it needs {hint}. Use --device ndarray to run on the CPU",
            kind.name()
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_that_panics_on_first_use_is_an_error_naming_it() {
        let err =
            probe_with(DeviceKind::Wgpu, || panic!("No possible adapter available")).unwrap_err();
        assert!(
            err.starts_with("device wgpu cannot be opened (No possible adapter available)"),
            "{err}"
        );
        assert!(err.contains("--device ndarray"), "{err}");
        let err = probe_with(DeviceKind::Cuda, || {
            panic!("{}", String::from("libcuda.so not found"))
        })
        .unwrap_err();
        assert!(
            err.contains("(libcuda.so not found)") && err.contains("NVIDIA"),
            "{err}"
        );
        assert_eq!(probe_with(DeviceKind::Wgpu, || ()), Ok(()));
        assert_eq!(DeviceKind::Ndarray.check().unwrap(), DeviceKind::Ndarray);
    }
}
