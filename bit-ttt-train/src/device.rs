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

/// Share of the free device memory that `--n-gpu-layers auto` plans with: the rest is left to
/// the runtime's memory pools (which allocate in pages) and to other programs.
pub const FREE_MEMORY_SHARE: f64 = 0.9;

impl DeviceKind {
    /// Bytes of device memory free now, as the driver reports them. Only CUDA reports them;
    /// wgpu has no such query (Vulkan's heap size is the total, not what is free).
    ///
    /// # Errors
    /// [`TrainError::InvalidSetting`] for a backend without the query, a binary without the
    /// backend, or a driver that fails (no GPU).
    pub fn free_memory(self) -> Result<u64, TrainError> {
        match self {
            DeviceKind::Cuda if self.compiled_in() => {
                crate::catch::catch_quietly_everywhere(cuda_free_memory)
                    .and_then(|free| free)
                    .map_err(|why| {
                        TrainError::InvalidSetting(format!(
                            "cannot ask the cuda device for its free memory ({why}); give --gpu-memory (e.g. 8GiB)"
                        ))
                    })
            }
            _ => Err(TrainError::InvalidSetting(format!(
                "device {} cannot report its free memory; give --gpu-memory (e.g. 8GiB)",
                self.name()
            ))),
        }
    }
}

/// The free memory of CUDA device 0 (the one Burn's default device opens), through the
/// driver's primary context, which cubecl shares.
fn cuda_free_memory() -> Result<u64, String> {
    #[cfg(feature = "cuda")]
    {
        let context = cudarc::driver::CudaContext::new(0).map_err(|e| e.to_string())?;
        context.bind_to_thread().map_err(|e| e.to_string())?;
        let (free, _total) = cudarc::driver::result::mem_get_info().map_err(|e| e.to_string())?;
        Ok(free as u64)
    }
    #[cfg(not(feature = "cuda"))]
    Err("not compiled in".into())
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

/// Runs `first_use` and turns a panic into a message naming `kind`, without the reports of
/// its panic or of the GPU runtime's threads on stderr.
fn probe_with(kind: DeviceKind, first_use: fn()) -> Result<(), String> {
    crate::catch::catch_quietly_everywhere(first_use).map_err(|why| {
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

    #[test]
    fn free_memory_is_an_error_that_says_what_to_give_where_it_cannot_be_asked() {
        for kind in [DeviceKind::Ndarray, DeviceKind::Wgpu] {
            let err = kind.free_memory().unwrap_err().to_string();
            assert!(
                err.contains(kind.name()) && err.contains("--gpu-memory"),
                "{err}"
            );
        }
        // With CUDA compiled in on a machine without a GPU the driver's absence is the
        // error; with a GPU the answer is a real, positive number of bytes.
        match DeviceKind::Cuda.free_memory() {
            Ok(free) => assert!(free > 0),
            Err(err) => assert!(err.to_string().contains("--gpu-memory"), "{err}"),
        }
    }
}
